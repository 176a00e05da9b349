"""Overlay panels, plots and markdown tables."""

import numpy as np
import pytest
from PIL import Image

from jaxad.eval import report


def test_heatmap_endpoints_and_clipping():
    rgb = report.heatmap(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]]), vmin=0.0, vmax=1.0)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [0, 0, 128]  # vmin: dark blue
    assert rgb[0, 3].tolist() == [128, 0, 0]  # vmax: dark red
    assert rgb[0, 2].tolist() == [128, 255, 128]
    assert rgb[0, 0].tolist() == rgb[0, 1].tolist() and rgb[0, 4].tolist() == rgb[0, 3].tolist()
    assert report.heatmap(np.ones((2, 2)), 1.0, 1.0)[0, 0].tolist() == [0, 0, 128]


def test_overlays_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 200, 180, 3), dtype=np.uint8)
    maps = rng.random((2, 50, 45)).astype(np.float32)  # lower resolution than the images
    masks = np.zeros((2, 200, 180), bool)
    masks[1, 50:120, 40:90] = True
    paths = report.save_overlays(tmp_path / "maps", images, maps, masks, names=["good/000", "crack/001"], scores=[0.1, 2.5])
    assert [p.name for p in paths] == ["good_000.png", "crack_001.png"]
    panel = np.asarray(Image.open(paths[1]))
    assert panel.shape == (report._HEADER + 200 + report._FOOTER, 3 * 180 + 2 * report._GAP, 3)
    np.testing.assert_array_equal(panel[report._HEADER + 30:report._HEADER + 200, :180], images[1, 30:])  # below the label
    without = report.save_overlays(tmp_path / "plain", images, maps)
    assert Image.open(without[0]).size == (2 * 180 + report._GAP, report._HEADER + 200 + report._FOOTER)


def test_small_greyscale_images_are_upscaled(tmp_path):
    images = np.random.default_rng(1).random((1, 40, 40)).astype(np.float32)
    (path,) = report.save_overlays(tmp_path, images, images, images > 0.9)
    assert Image.open(path).size == (3 * 160 + 2 * report._GAP, report._HEADER + 160 + report._FOOTER)


def test_overlays_share_one_colour_scale(tmp_path):
    images = np.zeros((2, 160, 160, 3), np.uint8)
    maps = np.stack([np.zeros((160, 160)), np.ones((160, 160))])
    low, high = (np.asarray(Image.open(p)) for p in report.save_overlays(tmp_path, images, maps))
    x, y = 160 + report._GAP + 80, report._HEADER + 100
    assert low[y, x, 2] > low[y, x, 0] and high[y, x, 0] > high[y, x, 2]  # blue vs red


def test_max_images_spreads_over_the_set(tmp_path):
    images = np.zeros((5, 160, 160), np.uint8)
    paths = report.save_overlays(tmp_path, images, images.astype(np.float32), max_images=3)
    assert [p.stem for p in paths] == ["0000", "0002", "0004"]


def test_line_plot_log_axes(tmp_path):
    x = np.array([1, 2, 4, 8, 16, 32, 0])  # the 0 cannot be shown on a log axis and is left out
    path = report.save_line_plot(
        tmp_path / "plots" / "bench.png", {"a": (x, 100 * x + 1), "b": (x, 30 * x**1.5 + 1)},
        "batch size", "images / s", "throughput", logx=True, logy=True,
    )
    image = np.asarray(Image.open(path))
    assert image.shape == (480, 640, 3) and image.std() > 0
    with pytest.raises(ValueError, match="nothing to plot"):
        report.save_line_plot(tmp_path / "empty.png", {"a": ([0.0], [1.0])}, "x", "y", "t", logx=True)


def test_roc_curve_png(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 30), rng.normal(2, 1, 30)]
    labels = np.r_[np.zeros(30), np.ones(30)]
    path = report.save_roc_curve(tmp_path / "roc.png", scores, labels, title="test")
    assert Image.open(path).size == (640, 480)


def test_ticks_are_round():
    assert report._ticks(0.0, 1.0, log=False) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert report._ticks(0.0, 5.0, log=True) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert report._ticks(0.0, 1.0, log=True) == pytest.approx([0.0, np.log10(2), np.log10(5), 1.0])


def test_markdown_table():
    rows = [
        {"category": "bottle", "image_auroc": 0.99876, "n_train": 209, "note": "a|b"},
        {"category": "tile", "image_auroc": float("nan"), "n_train": 762},
    ]
    assert report.markdown_table(rows, ["category", "image_auroc", "n_train", "note"], floatfmt=".3f") == (
        "| category | image_auroc | n_train | note |\n"
        "|---|---:|---:|---|\n"
        "| bottle | 0.999 | 209 | a\\|b |\n"
        "| tile | n/a | 762 |  |"
    )


def test_code_span_survives_backticks_inside():
    assert report.code_span("fit.py --x 1") == "`fit.py --x 1`"
    assert report.code_span("bench --note 'run `a` then ``b``'") == "``` bench --note 'run `a` then ``b``' ```"
