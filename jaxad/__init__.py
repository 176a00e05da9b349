"""jaxad: industrial visual anomaly detection in JAX/Flax.

Learn "normal" from defect-free images, then score new images and localise defects with pixel
maps. Subpackages follow the walk a batch takes: ``data`` → ``backbones`` → ``features`` →
``distances`` | ``nets`` → ``postprocess`` → ``eval``; ``methods`` composes them, with ``train``
(the shared optimiser loop) for the trained ones. ``pipeline`` runs fit → save → evaluate over a
method, ``bench`` measures, and ``runtime`` (compile options, device meshes) sits under all of it.
``config``, ``checkpoint``, ``cli`` and ``errors`` are the plumbing.
"""

__version__ = "0.1.0"
