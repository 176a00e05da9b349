"""Decision overlays: one colour scale, fixed by the calibration, for every image and every run."""

import numpy as np
from PIL import Image

from jaxad.eval import overlay, report

CALIBRATED = {"image_threshold": 2.0, "image_span": 1.0, "pixel_threshold": 4.0, "pixel_span": 2.0}
SIDE = 160  # no upscaling: panel pixels are map pixels


def _map_tile(path) -> np.ndarray:
    """The map-overlay tile of a saved panel, below its label."""
    panel = np.asarray(Image.open(path))
    return panel[report._HEADER + 30:report._HEADER + SIDE, SIDE + report._GAP:2 * SIDE + report._GAP]


def test_the_same_raw_value_has_the_same_colour_in_every_image_and_call(tmp_path):
    """A map of 3.0 everywhere is drawn the same beside a dim map, beside a bright one, or alone:
    the scale comes from the calibration, not from the maps drawn with it (a per-image or per-set
    scale would draw the flat map as its lowest colour in one and its highest in another)."""
    images = np.zeros((2, SIDE, SIDE, 3), np.uint8)
    flat = np.full((SIDE, SIDE), 3.0, np.float32)
    dim, bright = np.zeros_like(flat), np.full_like(flat, 50.0)
    with_dim = overlay.save_decisions(tmp_path / "a", CALIBRATED, images, [1.0, 1.0], np.stack([flat, dim]), ["x", "y"])
    with_bright = overlay.save_decisions(tmp_path / "b", CALIBRATED, images, [1.0, 9.0], np.stack([bright, flat]),
                                         ["y", "x"])
    (alone,) = overlay.save_decisions(tmp_path / "c", CALIBRATED, images[:1], [1.0], flat[None], ["x"])
    tiles = [_map_tile(p) for p in (with_dim[0], with_bright[1], alone)]
    np.testing.assert_array_equal(tiles[0], tiles[1])
    np.testing.assert_array_equal(tiles[0], tiles[2])
    # 3.0 normalises to 0.5 + 0.5 (3 - 4) / 2 = 0.25; drawn half over the black input
    want = np.round(0.5 * report.heatmap(np.full((1, 1), 0.25), 0.0, 1.0)[0, 0]).astype(np.uint8)
    assert (tiles[0] == want).all()
    assert not (_map_tile(with_dim[1]) == want).all()  # another value, another colour


def test_the_pixel_threshold_is_the_middle_of_the_bar_and_the_predicted_defect_is_outlined(tmp_path):
    images = np.zeros((1, SIDE, SIDE, 3), np.uint8)
    raw = np.full((1, SIDE, SIDE), 1.0, np.float32)
    raw[0, 60:100, 60:100] = 6.0  # above the pixel threshold, 4.0
    (path,) = overlay.save_decisions(tmp_path, CALIBRATED, images, [2.5], raw, ["crack/000"])
    panel = np.asarray(Image.open(path))
    tile = panel[report._HEADER:report._HEADER + SIDE, SIDE + report._GAP:2 * SIDE + report._GAP]
    white = (tile == report.PREDICTED).all(-1)
    assert white[60, 60:100].all() and white[99, 60:100].all() and white[60:100, 60].all()
    assert not white[70:90, 70:90].any() and not white[120:].any()  # inside and outside: colours
    assert path.name == "crack_000.png"
    normalised = overlay.normalised(CALIBRATED, np.array([2.0, 1.0]), np.array([4.0, 0.0]))
    np.testing.assert_allclose(normalised[0], [0.5, 0.0])
    np.testing.assert_allclose(normalised[1], [0.5, 0.0])
