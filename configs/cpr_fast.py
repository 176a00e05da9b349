"""CPR-Fast: CPR-Faster's config (see configs/cpr_faster.py) with 64-wide local descriptors."""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("jaxad_config_cpr_faster", Path(__file__).with_name("cpr_faster.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config() -> ml_collections.ConfigDict:
    c = _base.get_config()
    c.lrb_width = 64
    return c
