"""CPR: CPR-Faster's config (see configs/cpr_faster.py) with 384-wide local descriptors.

The paper's backbone is DenseNet201 (taps: outputs of denseblock1, 256 ch stride 4, and
denseblock2, 512 ch stride 8); once it is ported, run
``--config.backbone=densenet201 --config.taps="('features.denseblock1','features.denseblock2')"``.
The default stays on the bundled EfficientNet-Lite0 so it runs with no extra weights.
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("jaxad_config_cpr_faster", Path(__file__).with_name("cpr_faster.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config() -> ml_collections.ConfigDict:
    c = _base.get_config()
    c.lrb_width = 384
    c.search_chunk = 1  # 384-wide windows: one reference at a time keeps memory in check
    return c
