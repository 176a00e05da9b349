"""jaxad: industrial visual anomaly detection in JAX/Flax.

Learn "normal" from defect-free images, then score new images and localise defects with pixel
maps. Subpackages follow the walk a batch takes: ``data`` → ``backbones`` → ``features`` →
``distances`` → ``postprocess`` → ``metrics``/``report``; ``methods`` composes them.
"""

__version__ = "0.1.0"
