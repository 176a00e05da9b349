"""Synthetic dataset: MVTec layout, determinism, masks that cover exactly the changed pixels, pose variation."""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxad.data import synthetic
from jaxad.errors import DataError

SMALL = dict(image_size=64, n_train=4, n_test_good=2, n_per_defect=2)


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", seed=0, **SMALL)


def test_categories_cover_textures_and_objects_with_enough_defects():
    kinds = [c.kind for c in synthetic.CATEGORIES.values()]
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2
    for info in synthetic.CATEGORIES.values():
        assert len(info.defects) >= 3 and len(set(info.defects)) == len(info.defects)
        assert set(info.defects) <= set(synthetic.SURFACE_DEFECTS + synthetic.PART_DEFECTS)


def test_layout_is_mvtec(small):
    assert (small / "README.txt").is_file() and (small / synthetic.MARKER).is_file()
    assert sorted(p.name for p in small.iterdir() if p.is_dir()) == sorted(synthetic.CATEGORIES)
    for name, info in synthetic.CATEGORIES.items():
        cat = small / name
        assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(4)]
        assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good", *info.defects))
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(info.defects)
        assert len(list((cat / "test" / "good").iterdir())) == 2
        for path in (cat / "train" / "good").iterdir():
            with Image.open(path) as im:
                assert (im.mode, im.size) == ("RGB", (64, 64))
        for defect in info.defects:
            images = sorted((cat / "test" / defect).iterdir())
            masks = sorted((cat / "ground_truth" / defect).iterdir())
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images] and len(images) == 2
            for path, mask_path in zip(images, masks):
                with Image.open(path) as im, Image.open(mask_path) as mask:
                    assert mask.mode == "L" and mask.size == im.size == (64, 64)
                    values = np.asarray(mask)
                assert set(np.unique(values)) == {0, 255}, f"{mask_path} is not a non-empty 0/255 mask"


def test_files_are_the_rendered_examples_and_change_only_masked_pixels(small):
    for name, info in synthetic.CATEGORIES.items():
        for defect in info.defects:
            for i in range(2):
                rng = synthetic.image_rng(0, name, f"test/{defect}", i)
                example = synthetic.render_example(name, rng, 64, defect)
                saved = np.asarray(Image.open(small / name / "test" / defect / f"{i:03d}.png"))
                mask = np.asarray(Image.open(small / name / "ground_truth" / defect / f"{i:03d}_mask.png")) > 0
                np.testing.assert_array_equal(saved, _uint8(example.image))
                np.testing.assert_array_equal(mask, example.mask)
                changed = np.any(_uint8(example.image) != _uint8(example.normal), axis=-1)
                assert changed.any(), f"{name}/{defect}/{i}: the defect changes nothing"
                assert not np.any(changed & ~mask), f"{name}/{defect}/{i}: pixels changed outside the mask"
                inside = np.abs(example.image - example.normal)[mask].max(axis=-1)
                assert inside.mean() > 0.02, f"{name}/{defect}/{i}: the defect is nearly invisible"


def test_good_images_have_no_mask(small):
    for name in synthetic.CATEGORIES:
        example = synthetic.render_example(name, synthetic.image_rng(0, name, "test/good", 0), 64)
        assert example.mask is None and example.image is example.normal
        saved = np.asarray(Image.open(small / name / "test" / "good" / "000.png"))
        np.testing.assert_array_equal(saved, _uint8(example.image))
        assert not (small / name / "ground_truth" / "good").exists()


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kw = dict(categories=["weave", "gear"], image_size=48, n_train=2, n_test_good=1, n_per_defect=1)
    a = _files(synthetic.generate(tmp_path / "a", seed=3, **kw))
    b = _files(synthetic.generate(tmp_path / "b", seed=3, **kw))
    c = _files(synthetic.generate(tmp_path / "c", seed=4, **kw))
    assert a == b
    pngs = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in pngs)


def test_normal_images_vary():
    for name in synthetic.CATEGORIES:
        images = [synthetic.render_normal(name, np.random.default_rng(i), 64) for i in range(4)]
        assert all(im.shape == (64, 64, 3) and im.dtype == np.float32 for im in images)
        means = np.array([im.mean(axis=(0, 1)) for im in images])
        assert np.ptp(means, axis=0).max() > 0.005, f"{name}: no lighting or colour variation"
        assert min(np.abs(images[0] - im).mean() for im in images[1:]) > 0.02


def _pose(cover: np.ndarray) -> tuple[float, float, float]:
    """Centroid (y, x) and principal-axis angle of a coverage map."""
    y, x = np.mgrid[: cover.shape[0], : cover.shape[1]]
    w = cover / cover.sum()
    cy, cx = (w * y).sum(), (w * x).sum()
    mu20, mu02, mu11 = (w * (x - cx) ** 2).sum(), (w * (y - cy) ** 2).sum(), (w * (x - cx) * (y - cy)).sum()
    return cy, cx, 0.5 * np.arctan2(2 * mu11, mu20 - mu02)


def test_objects_vary_in_pose():
    for name, info in synthetic.CATEGORIES.items():
        if info.kind != "object":
            continue
        covers = [synthetic._RENDER[name](np.random.default_rng(i), 64).cover for i in range(8)]
        poses = np.array([_pose(c) for c in covers])
        assert poses[:, :2].std(axis=0).min() > 0.5, f"{name}: the object does not move"
        if name != "gear":  # elongated objects: the principal axis turns
            axis = np.exp(2j * poses[:, 2])  # angles modulo pi
            assert np.abs(axis.mean()) < 0.8, f"{name}: the object does not turn"
        iou = [np.minimum(a, b).sum() / np.maximum(a, b).sum() for a, b in zip(covers, covers[1:])]
        assert max(iou) < 0.95, f"{name}: consecutive poses overlap almost exactly"


def test_gear_turns():
    """The gear's keyed bore breaks its symmetry: rotations give covers that differ after centring."""
    covers = []
    for i in range(4):
        cover = synthetic._RENDER["gear"](np.random.default_rng(i), 128).cover
        cy, cx, _ = _pose(cover)
        covers.append(np.roll(cover, (64 - round(cy), 64 - round(cx)), axis=(0, 1)))
    diffs = [np.abs(a - b).mean() for a, b in zip(covers, covers[1:])]
    assert min(diffs) > 0.01


def test_add_defect_on_any_image_stays_in_region():
    rng = np.random.default_rng(0)
    image = (0.5 + 0.05 * rng.standard_normal((48, 80, 3))).astype(np.float32)
    region = np.zeros((48, 80), np.float32)
    region[10:40, 20:70] = 1
    for kind in synthetic.SURFACE_DEFECTS:
        out, mask = synthetic.add_defect(image, kind, np.random.default_rng(1), region=region)
        assert out.shape == image.shape and out.dtype == np.float32 and mask.shape == (48, 80)
        assert mask.any() and not np.any(mask & (region == 0)), kind
        assert np.array_equal(out[~mask], image[~mask]), kind
    with pytest.raises(ValueError):
        synthetic.add_defect(image, "missing", rng)


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(DataError):
        synthetic.render_normal("nope", np.random.default_rng(0))
    with pytest.raises(ValueError):
        synthetic.render_example("weave", np.random.default_rng(0), 64, "extra")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(DataError):
        synthetic.generate(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args)

    real = synthetic._write_image
    monkeypatch.setattr(synthetic, "_write_image", failing)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path / "data", categories=["weave"], **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_ensure_generates_once_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))
    assert synthetic.default_root(2) == tmp_path / "cache" / "synthetic-v1-seed2"
    kw = dict(SMALL, n_train=2, categories=["grain", "screw"])
    root = synthetic.ensure(seed=2, progress=None, **kw)
    assert root == synthetic.default_root(2) and (root / "grain" / "train" / "good" / "001.png").is_file()
    marker = (root / synthetic.MARKER).stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "generate", forbidden)
    assert synthetic.ensure(seed=2, progress=None, **kw) == root
    assert synthetic.ensure(seed=2, progress=None, **dict(kw, categories=["screw"])) == root
    monkeypatch.undo()
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))
    synthetic.ensure(seed=2, progress=None, **dict(kw, n_train=3))  # other settings: regenerated in place
    assert (root / "grain" / "train" / "good" / "002.png").is_file()
    assert (root / synthetic.MARKER).stat().st_mtime_ns != marker
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]


def test_cli_writes_a_dataset(tmp_path, capsys):
    synthetic.main([str(tmp_path / "d"), "--seed", "1", "--size", "48", "--categories", "capsule", "--n-train", "1",
                    "--n-test-good", "1", "--n-per-defect", "1"])
    assert (tmp_path / "d" / "capsule" / "test" / "missing" / "000.png").is_file()
    assert "capsule" in capsys.readouterr().out


@pytest.mark.slow
def test_default_dataset_generates(tmp_path):
    start = time.perf_counter()
    root = synthetic.generate(tmp_path / "default")
    seconds = time.perf_counter() - start
    n = sum(1 for _ in root.rglob("*.png"))
    print(f"default synthetic dataset: {n} PNGs in {seconds:.1f}s")
    expected = sum(60 + 12 + 2 * 6 * len(c.defects) for c in synthetic.CATEGORIES.values())
    assert n == expected
