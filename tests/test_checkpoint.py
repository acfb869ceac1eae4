import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asr.checkpoint import (
    CONFIG_FILE,
    INT8_SCALE_SUFFIX,
    WEIGHTS_FILE,
    ModelLoadError,
    dequantize_int8,
    load_model,
    quantize_int8,
    save_model,
)
from asr.features import CMVN, N_MELS
from asr.model import ASRModel, ModelDimensions
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


def test_int8_rows_round_trip_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    w[5] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,) and int(q.abs().max()) == 127
    back = dequantize_int8(q, scale)
    assert torch.all((back - w).abs() <= scale[:, None] / 2 + 1e-12)
    assert torch.equal(back[5], torch.zeros(40))


def test_int8_save_is_a_quarter_and_loads_as_float32(tmp_path: Path) -> None:
    torch.manual_seed(4)  # wide enough that the projections pass INT8_MIN_ELEMENTS
    dims = ModelDimensions(d_model=64, n_layers=2, d_state=16, head_dim=16, frontend_channels=8)
    model = ASRModel(dims, CMVN(torch.randn(N_MELS), torch.rand(N_MELS) + 0.5)).eval()
    path = save_model(model, tmp_path / "float32")
    small = save_model(model, tmp_path / "int8", dtype=torch.float16, int8=True)
    assert (small / WEIGHTS_FILE).stat().st_size < 0.3 * (path / WEIGHTS_FILE).stat().st_size
    raw = json.loads((small / CONFIG_FILE).read_text())
    stored = load_file(small / WEIGHTS_FILE)
    assert "layers.0.mixer.in_proj.weight" in raw["int8_weights"]
    assert all(stored[n].dtype == torch.int8 for n in raw["int8_weights"])
    assert stored["layers.0.mixer.A_log"].dtype == torch.float16  # small tensors keep the dtype
    loaded, config = load_model(small)
    assert config.int8_weights == tuple(raw["int8_weights"])
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.float32
        step = tensor.abs().amax() / 127 if name in config.int8_weights else tensor.abs().amax() / 1024
        assert (got - tensor).abs().max() <= step, name
    feats = torch.randn(1, 40, N_MELS)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(feats), model(feats), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("drop_scale", "or its scale .* is missing"),
        ("float_weight", "must be an int8 matrix with one scale per row"),
        ("scale_shape", "must be an int8 matrix with one scale per row"),
    ],
)
def test_bad_int8_weights_are_a_clear_error(
    saved: tuple[ASRModel, Path], tmp_path: Path, damage: str, message: str
) -> None:
    model, _ = saved
    path = save_model(model, tmp_path / "int8", int8=True)
    tensors = load_file(path / WEIGHTS_FILE)
    name = json.loads((path / CONFIG_FILE).read_text())["int8_weights"][0]
    if damage == "drop_scale":
        del tensors[name + INT8_SCALE_SUFFIX]
    elif damage == "float_weight":
        tensors[name] = tensors[name].float()
    else:
        tensors[name + INT8_SCALE_SUFFIX] = tensors[name + INT8_SCALE_SUFFIX][:1]
    save_file(tensors, path / WEIGHTS_FILE)
    with pytest.raises(ModelLoadError, match=f"{re.escape(name)}.*{message}|{message}.*{re.escape(name)}"):
        load_model(path)


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
