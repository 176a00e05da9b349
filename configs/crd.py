"""CRD with the bundled EfficientNet-Lite0 (real ImageNet weights, no setup).

distance: any protocol distance of jaxad/distances (``crd``, ``kernel_crd``, ``mahalanobis``, or one
you add). position: ``global`` (the paper: one M), ``blocks`` (one M per ``position_blocks``² tile
of the grid) or ``location`` (one per grid cell; refused when the Grams would exceed 2 GiB).

λ: ``lam_mode='trace'`` scales λ by trace(G)/d, so the same value means the same for any number of
patches and feature scale (``'absolute'`` is the paper's λ on Σ f fᵀ: with these features its λ=5
is ~1e-4 of G's smallest eigenvalue and changes nothing). ``lam='auto'`` picks one of
``lam_candidates`` on synthetic anomalies pasted into every k-th training image (k = 1/lam_heldout, from the second),
never on test data; or give a number, e.g. ``--config.lam=0.1``.

Taps: stage1 + stage2 + stage4 (PaDiM's taps: the stride-4 tap sets a 64×64 grid at 256 px) were chosen
over stage2 + stage4 (stride 8, d = 152) without test images, by ``python scripts/bench.py --method crd
--select taps=...`` on held-out training images with synthetic anomalies: the global CRD picked them on
both Magnetic Tile (held-out AUPRO 0.544 against 0.509) and bottle (0.611 against 0.599); BENCHMARKS.md,
``select-taps-crd-real-cpu``. The same selection kept stride 8 for ``position=blocks`` on bottle
(0.696 against 0.657) and chose stride 4 for it on Magnetic Tile (0.518 against 0.482).
On the test sets (measured after the choice, not used for it) global CRD's AUPRO went from 0.703 to 0.711
on Magnetic Tile and from 0.915 to 0.902 on bottle (``crd-taps-magnetic_tile-cpu``, ``crd-taps-bottle-cpu``).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "crd"
    c.backbone = "efficientnet_lite0"
    c.weights = ""  # empty: the bundled or cached weights of `backbone`; else a .pth/.safetensors path
    c.compute_dtype = "float32"  # or "bfloat16": backbone compute only (BENCHMARKS.md gives its error)
    c.taps = ("stage1", "stage2", "stage4")  # strides 4, 8, 16 (24 + 40 + 112 ch): d = 176 on a stride-4 grid
    c.aggregate = 3  # k×k local average of each tap before concatenation (1 = off)
    c.image_size = 256
    c.distance = "crd"
    c.position = "global"  # global | blocks | location
    c.position_blocks = 8  # K for position=blocks: K×K tiles of the feature grid
    c.lam = "auto"  # 'auto' or a positive number (a string on the command line either way)
    c.lam_mode = "trace"  # absolute | trace | per_patch
    c.lam_candidates = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
    c.lam_heldout = 0.15  # fraction of training images held out to choose λ, then added back
    c.rff_dim = 1024  # kernel_crd: random Fourier features
    c.rff_scale = 1.0  # kernel_crd: bandwidth = this × the median patch distance
    c.reg = 0.01  # mahalanobis: ε·I added to every covariance
    c.image_score = "max"  # max (the paper) | topk_mean
    c.image_topk = 10  # patches averaged by topk_mean
    c.blur_sigma = 4.0
    c.batch_size = 16
    c.seed = 0
    c.num_overlays = 16
    return c
