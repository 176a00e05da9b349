"""What several test files need: the calibration split a fit makes, rows of a markdown table, and a
record of the files a piece of code opens."""

import builtins
from pathlib import Path

import PIL.Image
import pytest

from jaxad import checkpoint, pipeline
from jaxad.data import open_dataset


def calibration_split(workdir: Path, data: Path) -> tuple[int, int]:
    """(training images the model in ``workdir`` was fitted on, images held out to calibrate it), as
    the pipeline splits ``data`` for the workdir's config: counts no test needs to hard-code."""
    config, _ = checkpoint.load(workdir)
    fitted, held, _ = pipeline.split_for_calibration(config, open_dataset(data))
    return len(fitted.train), len(held)


def markdown_rows(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows, as {column: cell}, of the first markdown table in ``text`` whose header line
    starts with ``header_start`` (such as ``"| dataset | method"``)."""
    lines = text.splitlines()
    top = lines.index(next(line for line in lines if line.startswith(header_start)))
    columns = [c.strip() for c in lines[top].strip("|").split("|")]
    rows = []
    for line in lines[top + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def record_opened_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that receives every path opened through ``open`` or ``PIL.Image.open`` until
    ``monkeypatch.undo()``: how a test proves that a choice never read the test split."""
    opened: list[str] = []

    def recording(original):
        def wrapper(file, *args, **kwargs):
            opened.append(str(file))
            return original(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(PIL.Image, "open", recording(PIL.Image.open))
    return opened
