"""The FLOP count and the matmul yardstick behind the speed tables."""

import pytest

from jaxad import backbone_benchmark, timing


def test_gflop_per_image_counts_the_forward_up_to_the_deepest_tap():
    taps = ("layer1", "layer2")
    small, large = (backbone_benchmark.gflop_per_image("resnet18", taps, s) for s in (64, 128))
    assert large / small == pytest.approx(4.0, rel=0.1)  # a conv net's work grows with the pixel count
    shallower = backbone_benchmark.gflop_per_image("resnet18", ("layer1",), 128)
    assert 0 < shallower < large  # the forward stops at the deepest requested tap


def test_matmul_gflops_is_a_positive_rate():
    assert timing.matmul_gflops(size=128, repeats=2) > 0
