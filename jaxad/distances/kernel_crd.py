"""Kernel CRD: CRD on random Fourier features, a ridge fit in the RKHS of a Gaussian kernel.

φ(f) = √(2/D) cos(Wᵀf + b), W ~ N(0, 1/σ²), b ~ U(0, 2π), approximates k(f, g) = exp(−‖f−g‖²/2σ²)
with φ(f)·φ(g) (Rahimi & Recht). CRD on φ then measures how well a query is explained by a
kernel ridge regression on the training patches, still with a D×D Gram (``config.rff_dim``)
and any ``config.position``. σ is the median distance between patches of the first batch,
times ``config.rff_scale``: a scale-free default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.distances import crd, protocol
from jaxad.distances.protocol import Stats

BANDWIDTH_SAMPLE = 512  # patches of the first batch whose pairwise distances set σ


def bandwidth(sample: np.ndarray, seed: int) -> float:
    """Median pairwise Euclidean distance of up to BANDWIDTH_SAMPLE patches."""
    x = np.asarray(sample, np.float64).reshape(-1, sample.shape[-1])
    x = x[np.random.default_rng(seed).permutation(len(x))[:BANDWIDTH_SAMPLE]]
    sq = np.sum(x * x, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    return float(np.sqrt(np.median(d2[np.triu_indices(len(x), 1)])))


def init(config: ml_collections.ConfigDict, sample: jax.Array) -> Stats:
    d, dim = sample.shape[-1], config.rff_dim
    sigma = max(bandwidth(np.asarray(sample), config.seed) * config.rff_scale, 1e-12)
    k_w, k_b = jax.random.split(jax.random.key(config.seed))
    context = {"rff_w": jax.random.normal(k_w, (d, dim), jnp.float32) / sigma,
               "rff_b": jax.random.uniform(k_b, (dim,), jnp.float32, 0.0, 2 * np.pi)}
    return crd.init_with(context, config, sample, dim)


def stats_bytes(config: ml_collections.ConfigDict, d: int, grid: tuple[int, int]) -> int:
    return crd.stats_bytes(config, config.rff_dim, grid)


DISTANCE = protocol.Distance(init, crd.update, crd.finalize, crd.score_params, stats_bytes)
