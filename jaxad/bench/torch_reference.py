"""The torchvision/timm side of ``bench.py --backbones``: the same backbone and taps, eager and compiled.

Imported only by that benchmark; it needs the ``port`` extra (torch, torchvision, timm), which jaxad
itself never does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# timm's EfficientNet-Lite stage outputs at strides 4/8/16/32 are jaxad's stage1/stage2/stage4/stage6
LITE_STAGES = {"stage1": 1, "stage2": 2, "stage4": 3, "stage6": 4}


def reaches(name: str, tap: str) -> bool:
    """Whether the torch model of ``name`` can stop at jaxad's ``tap`` (timm's EfficientNet-Lite
    only at the ends of its stride stages; torchvision's models at every tap)."""
    return not name.startswith("efficientnet_lite") or tap in LITE_STAGES


def _extractor(name: str, taps: tuple[str, ...]):
    import timm
    import torch
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    if name.startswith("efficientnet_lite"):
        model = timm.create_model(f"tf_{name}", pretrained=False, features_only=True,
                                  out_indices=tuple(LITE_STAGES[t] for t in taps))
        # timm's feature model runs all its blocks whatever out_indices asks for; stop after the
        # block whose output is the deepest tap, as jaxad's forward does
        model.blocks = model.blocks[: max(f["stage"] for f in model.feature_info.get_dicts())]
    else:
        model = create_feature_extractor(getattr(torchvision.models, name)(weights=None), {t: t for t in taps})
    torch.set_num_threads(os.cpu_count() or 1)
    return model.eval()


def extraction(name: str, taps: tuple[str, ...], size: int, batch: int, compiled: bool = False,
               device: str = "cpu") -> Callable[[], None]:
    """One forward of the torch model on fixed [batch, 3, size, size] random images, as a call that
    returns when the work is done (the first call of a compiled model compiles)."""
    import torch

    model = _extractor(name, taps).to(device)
    if compiled:
        model = torch.compile(model)
    x = torch.rand(batch, 3, size, size, device=device)

    @torch.inference_mode()
    def call() -> None:
        model(x)
        if device != "cpu":
            torch.cuda.synchronize()

    return call


def weight_bytes(name: str, taps: tuple[str, ...]) -> int:
    """Bytes of the torch feature extractor's parameters and buffers (the layers up to its deepest tap)."""
    model = _extractor(name, taps)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
