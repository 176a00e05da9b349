"""PUAD: EfficientAD (configs/efficientad.py, every key of it applies) + a Mahalanobis score on
globally pooled features, both z-scored on the validation split and summed with weights.

``feature``: "student" (the student's first C channels, the paper's best: 93.12 mean AUROC on
MVTec LOCO with EfficientAD-S) or "teacher" (the standardised teacher output, 92.24).
"""

import importlib.util
from pathlib import Path

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("jaxad_config_efficientad", Path(__file__).with_name("efficientad.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.method = "puad"
    c.feature = "student"  # "student" (first C channels) or "teacher"
    c.w_effad = 1.0  # weight of z(EfficientAD image score)
    c.w_maha = 1.0  # weight of z(Mahalanobis distance)
    return c
