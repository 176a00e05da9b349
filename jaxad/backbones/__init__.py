"""Pretrained feature extractors by name: ``bb = load(name); bb(images, taps) -> {tap: NHWC map}``."""

from jaxad.backbones import efficientnet_lite  # noqa: F401  (registered first: efficientnet_lite0 is the default)
from jaxad.backbones import densenet, efficientnet, resnet  # noqa: F401  (each module registers its names)
from jaxad.backbones.registry import Backbone, Entry, TapInfo, cache_dir, install_weights, load, names, random_init, register, tap_info, taps_up_to
from jaxad.backbones.torch_weights import read_state_dict

__all__ = ["Backbone", "Entry", "TapInfo", "cache_dir", "install_weights", "load", "names", "random_init", "read_state_dict", "register", "tap_info", "taps_up_to"]
