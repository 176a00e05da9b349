"""Judging a fitted model: threshold-free metrics (:mod:`~jaxad.eval.metrics`: AUROC, AP, AUPRO,
F1) and what a person looks at (:mod:`~jaxad.eval.report`: maps, curves, tables)."""
