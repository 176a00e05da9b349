"""Patch distances: how far a query feature lies from what was seen in training.

Memory-free, through the streaming protocol of :mod:`~jaxad.distances.protocol` (``get(name)``):
:mod:`~jaxad.distances.crd` (collaborative representation, global or per position),
:mod:`~jaxad.distances.kernel_crd` (CRD on random Fourier features), :mod:`~jaxad.distances.mahalanobis`
(Gaussians, global or per position). With a memory bank: :mod:`~jaxad.distances.knn` (exact nearest
neighbour), :mod:`~jaxad.distances.coreset` (greedy subsampling of the bank),
:mod:`~jaxad.distances.windowed` (CPR's windowed cosine search). Between whole images:
:mod:`~jaxad.distances.matching` (feature-matching counts)."""

from jaxad.distances import crd, protocol
from jaxad.distances.protocol import Distance, Stats, get, names

__all__ = ["Distance", "Stats", "crd", "get", "names", "protocol"]
