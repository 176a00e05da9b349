"""Measuring jaxad: the accuracy/speed harness over datasets (:mod:`~jaxad.bench.harness`),
backbone and distance speed (:mod:`~jaxad.bench.backbone_speed`, :mod:`~jaxad.bench.distance_speed`),
wall-clock timing (:mod:`~jaxad.bench.timing`) and the torch side of speed comparisons
(:mod:`~jaxad.bench.torch_reference`, which needs the ``port`` extra). ``scripts/bench.py`` is its CLI."""
