"""Default weights: torch's download cache, hash-checked names, and ports kept as defaults."""

import hashlib

import numpy as np
import pytest
from test_backbones import bundled_pth, write_zip
from test_pipeline import run_script

from jaxad import backbones
from jaxad.backbones import hub, registry
from jaxad.backbones.torch_weights import read_state_dict
from jaxad.errors import WeightsError


@pytest.fixture(autouse=True)
def _homes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _named(tmp_path, data: bytes, good: bool):
    digest = hashlib.sha256(data).hexdigest()[:8]
    path = tmp_path / f"w-{digest if good else 'deadbeef'}.pth"
    path.write_bytes(data)
    return path


def test_hash_prefix_in_the_name_is_checked(tmp_path):
    hub.check_hash(_named(tmp_path, b"weights", good=True))
    with pytest.raises(WeightsError, match="does not start with deadbeef"):
        hub.check_hash(_named(tmp_path, b"weights", good=False))


def test_missing_weights_say_the_command_to_run(tmp_path):
    with pytest.raises(WeightsError, match=r"python scripts/port_weights.py densenet201 --from /path/to/densenet201-c1103571.pth"):
        hub.finder("densenet201")()
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in hub.missing_message("densenet201")


def test_cached_torch_file_is_found_and_a_corrupt_one_refused(tmp_path):
    folder = hub.checkpoints_dir()
    folder.mkdir(parents=True)
    name = hub.TORCHVISION_FILES["resnet18"][0]
    (folder / name).write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="truncated or not the published one"):
        hub.finder("resnet18")()


def test_port_makes_the_default_weights(tmp_path):
    state = read_state_dict(bundled_pth())
    state["_conv_stem.weight"] = 2.0 * state["_conv_stem.weight"]
    mine = tmp_path / "mine.pth"
    write_zip(mine, state)
    bundled = backbones.load("efficientnet_lite0").variables["params"]["stem_conv"]["kernel"]
    path = backbones.install_weights("efficientnet_lite0", mine)
    assert path == registry.ported_path("efficientnet_lite0") and path.is_file()
    ported = backbones.load("efficientnet_lite0").variables["params"]["stem_conv"]["kernel"]
    np.testing.assert_allclose(np.asarray(ported), 2.0 * np.asarray(bundled), rtol=1e-6)
    explicit = backbones.load("efficientnet_lite0", bundled_pth()).variables["params"]["stem_conv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(bundled))  # a named file wins


def test_port_script_errors_in_one_line(tmp_path, capsys):
    code, _, err = run_script("port_weights.py", "efficientnet_lite0", "--from", tmp_path / "nope.pth", capsys=capsys)
    assert code == 2 and "nope.pth: weight file not found" in err and "Traceback" not in err
    code, out, _ = run_script("port_weights.py", "efficientnet_lite0", capsys=capsys)
    assert code == 0 and "converted weights saved to" in out
