"""The run report: one HTML file that needs nothing else to be read."""

import base64
import io
import re

import numpy as np
from PIL import Image

from jaxad.data import Sample
from jaxad.eval import metrics, run_report

SIZE = (32, 40)


def _run(tmp_path, calibrated=None):
    """A small test split (5 good, 2 crack, 2 hole) written as PNGs, with scores, maps and masks."""
    rng = np.random.default_rng(0)
    kinds = ["good"] * 5 + ["crack"] * 2 + ["hole"] * 2
    samples = []
    for i, kind in enumerate(kinds):
        path = tmp_path / kind / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, int(kind != "good"), kind))
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.15, 0.8, 0.95, 0.5, 0.7])  # good/002 outscores two defects
    labels = np.array([s.label for s in samples])
    masks = np.zeros((9, *SIZE), bool)
    masks[5:, 10:20, 10:20] = True
    maps = rng.random((9, *SIZE)).astype(np.float32) + masks * scores[:, None, None].astype(np.float32)
    result = metrics.evaluate(scores, labels, maps, masks)
    result["per_defect_image_auroc"] = metrics.evaluate_by_group(scores, labels, kinds)
    result["per_defect_pixel"] = metrics.pixel_metrics_by_group(maps, masks, labels, kinds)
    path = run_report.write(tmp_path / "report.html", "crd on toy", result, scores, maps, masks, samples, SIZE, calibrated)
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained_and_holds_the_tables(tmp_path):
    page = _run(tmp_path)
    links = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert not re.search(r"<(script|link|iframe)|url\(|@import", page)
    for link in links:  # every picture decodes
        Image.open(io.BytesIO(base64.b64decode(link.split(",", 1)[1]))).verify()
    assert page.count("<table") == 4  # metrics, confusion matrix, its rates, per defect type
    assert ">image_auroc</td>" in page and ">aupro</td>" in page
    for kind in ("good", "crack", "hole"):
        assert f"<td>{kind}</td>" in page
    assert "ROC curve" in page and "precision-recall curve" in page


def test_decisions_use_the_best_f1_threshold_and_say_so(tmp_path):
    page = _run(tmp_path)
    # best F1 (8/9) at 0.5: flags every defect and good/002 (0.9)
    assert "Decisions at threshold 0.5000" in page and "best-F1 threshold on this test set" in page
    assert "percentiles (the model stores no calibration)" in page  # no fixed colour scale either
    assert re.search(r"<td>normal</td><td class=\"num\">4</td><td class=\"num\">1</td>", page)
    assert re.search(r"<td>anomalous</td><td class=\"num\">0</td><td class=\"num\">4</td>", page)


def test_a_stored_threshold_is_used_instead(tmp_path):
    calibrated = {"image_threshold": 0.85, "image_span": 0.8, "pixel_threshold": 1.2, "pixel_span": 1.0}
    page = _run(tmp_path, calibrated)
    assert "Decisions at threshold 0.8500" in page and "stored with the model" in page
    assert "the colour scale the calibration fixed" in page and "percentiles" not in page
    assert "best-F1 threshold on this test set" not in page
    assert re.search(r"<td>normal</td><td class=\"num\">4</td><td class=\"num\">1</td>", page)
    assert re.search(r"<td>anomalous</td><td class=\"num\">3</td><td class=\"num\">1</td>", page)


def test_galleries_show_the_worst_ranked_images_first(tmp_path):
    page = _run(tmp_path)
    shown = re.findall(r'<img alt="([^"]+)"', page)
    normal = [a for a in shown if a.startswith("good/")]
    defects = [a for a in shown if a.startswith(("crack/", "hole/"))]
    assert normal == ["good/002.png", "good/003.png", "good/001.png", "good/004.png", "good/000.png"]
    assert defects == ["hole/007.png", "hole/008.png", "crack/005.png", "crack/006.png"]
