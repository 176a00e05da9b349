"""The FLOP count, the matmul yardstick and the timing rules behind the speed tables."""

import os

import jax
import pytest

from jaxad.bench import backbone_speed, timing


@pytest.mark.slow
def test_gflop_per_image_counts_the_forward_up_to_the_deepest_tap():
    taps = ("layer1", "layer2")
    small, large = (backbone_speed.gflop_per_image("resnet18", taps, s) for s in (64, 128))
    assert large / small == pytest.approx(4.0, rel=0.1)  # a conv net's work grows with the pixel count
    shallower = backbone_speed.gflop_per_image("resnet18", ("layer1",), 128)
    assert 0 < shallower < large  # the forward stops at the deepest requested tap


def test_matmul_gflops_is_a_positive_rate():
    assert timing.matmul_gflops(size=128, repeats=2) > 0


def test_interleaved_timing_alternates_the_contenders_round_by_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("jaxad", "torch")}
    seconds = timing.interleaved_median_seconds(fns, rounds=3, per_round=2, warmup=1, pause=0.0)
    assert calls == ["jaxad", "torch"] + ["jaxad", "jaxad", "torch", "torch"] * 3
    assert set(seconds) == {"jaxad", "torch"} and all(s >= 0 for s in seconds.values())


def test_a_measurement_can_run_in_a_process_of_its_own():
    assert timing.in_own_process(os.getpid) != os.getpid()
    assert timing.in_own_process(sum, (1, 2, 3)) == 6


def test_stages_run_in_network_order_up_to_the_deepest_tap():
    assert backbone_speed.stages("resnet18", "layer2") == ("conv1", "maxpool", "layer1", "layer2")
    assert backbone_speed.stages("resnet18", "conv1") == ("conv1",)


@pytest.mark.slow
def test_weight_bytes_count_the_layers_up_to_the_deepest_tap():
    # ResNet18 to layer1: the 7×7 stem over RGB, four 3×3 convolutions 64→64, five BatchNorms (scale,
    # bias, mean, variance); on CPU also the 3×3 kernels transformed for Winograd, 6×6 in place of 3×3.
    stem, conv3x3, norms = 7 * 7 * 3 * 64, 3 * 3 * 64 * 64, 5 * 4 * 64
    winograd = 4 * 6 * 6 * 64 * 64 if jax.default_backend() == "cpu" else 0
    assert backbone_speed.weight_bytes("resnet18", ("conv1", "layer1")) == 4 * (stem + 4 * conv3x3 + norms + winograd)
    assert backbone_speed.weight_bytes("resnet18", ("layer2",)) > backbone_speed.weight_bytes("resnet18", ("layer1",))
