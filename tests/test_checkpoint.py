import json
from pathlib import Path

import pytest
import torch

from asr.checkpoint import CONFIG_FILE, WEIGHTS_FILE, ModelLoadError, load_model, save_model
from asr.features import CMVN, N_MELS
from asr.model import ASRModel
from tests.conftest import TINY


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ASRModel, Path]:
    torch.manual_seed(3)
    model = ASRModel(TINY, CMVN(torch.randn(N_MELS), torch.rand(N_MELS) + 0.5)).eval()
    return model, save_model(model, tmp_path / "m", info={"steps": 12})


def test_round_trip(saved: tuple[ASRModel, Path]) -> None:
    model, path = saved
    loaded, config = load_model(path)
    assert config.dims == TINY and config.info == {"steps": 12}
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded.cmvn.mean, model.cmvn.mean) and torch.equal(loaded.cmvn.istd, model.cmvn.istd)
    feats = torch.randn(1, 40, N_MELS)
    with torch.inference_mode():
        assert torch.equal(model(feats), loaded(feats))
    raw = json.loads((path / CONFIG_FILE).read_text())
    assert set(raw) >= {"format_version", "dims", "features", "cmvn", "vocab"}
    assert len(raw["cmvn"]["mean"]) == N_MELS and raw["vocab"][0] == "<blank>"


def test_half_precision_save_is_smaller_and_close(saved: tuple[ASRModel, Path], tmp_path: Path) -> None:
    model, path = saved
    half = save_model(model, tmp_path / "half", dtype=torch.float16)
    assert (half / WEIGHTS_FILE).stat().st_size < 0.6 * (path / WEIGHTS_FILE).stat().st_size
    loaded, _ = load_model(half)
    assert loaded.head.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.head.weight, model.head.weight, rtol=1e-3, atol=1e-3)


def _edit_config(path: Path, edit) -> None:
    raw = json.loads((path / CONFIG_FILE).read_text())
    edit(raw)
    (path / CONFIG_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(format_version=99), "format_version 99 is not supported"),
        (lambda c: c.pop("cmvn"), r"missing keys \['cmvn'\]"),
        (lambda c: c["dims"].update(d_model=64), "weights do not match config.json"),
        (lambda c: c["dims"].update(n_layers=3), "missing layers.2"),
        (lambda c: c["dims"].update(colour=1), r"unknown model dimensions \['colour'\]"),
        (lambda c: c["features"].update(hop_ms=20), "trained with features"),
        (lambda c: c.update(vocab=["<blank>", " ", "A"]), "vocabulary has 3 entries"),
        (lambda c: c["cmvn"].update(mean=[0.0]), "invalid config"),
    ],
)
def test_bad_config_is_a_clear_error(saved: tuple[ASRModel, Path], edit, message: str) -> None:
    _, path = saved
    _edit_config(path, edit)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_and_corrupt_files(saved: tuple[ASRModel, Path], tmp_path: Path) -> None:
    _, path = saved
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_model(tmp_path / "nope")
    (path / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_model(path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors: missing"):
        load_model(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(path)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(ModelLoadError, match="config.json: missing"):
        load_model(path)


def test_save_leaves_no_temporary_files(saved: tuple[ASRModel, Path]) -> None:
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
