"""ONNX export of the streaming step (export/onnx.py) and `asr export` / `asr transcribe --onnx`."""

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

import export.onnx
from asr.checkpoint import ModelLoadError, load_model
from asr.features import CMVN, N_MELS, SUBSAMPLING
from asr.model import ASRModel
from asr.text import VOCAB
from asr.transcribe import transcribe_file
from export.onnx import OUTPUT_NAMES, OnnxModel, export_onnx
from tests.conftest import TINY
from tests.test_cli import _run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[ASRModel, Path]:
    """The tiny model (with a CMVN that is not the identity) and its export."""
    model, config = load_model(tiny_model_dir)
    torch.manual_seed(7)
    model.set_cmvn(CMVN(torch.randn(N_MELS), torch.rand(N_MELS) + 0.5))  # config.cmvn is still the identity
    return model, export_onnx(model, config, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_streams_in_any_chunks_as_the_offline_forward(exported: tuple[ASRModel, Path]) -> None:
    """Invariant 1 through the exported graph: 3 streams, chunks of 0-16 encoder frames, a padded tail."""
    model, path = exported
    onnx_model = OnnxModel(path)
    feats = torch.randn(3, SUBSAMPLING * 45 + 3, N_MELS) * 2
    with torch.inference_mode():
        offline = model(feats)
    padded = onnx_model.pad_features(feats)
    assert torch.equal(padded, model.pad_features(feats))
    state, start, pieces, rng = onnx_model.init_state(3), 0, [], random.Random(0)
    while start < padded.shape[1]:
        size = SUBSAMPLING * rng.choice([0, 1, 2, 5, 16])
        logits, returned = onnx_model.chunk(padded[:, start : start + size], state)
        assert returned is state and logits.shape == (
            3,
            min(size, padded.shape[1] - start) // SUBSAMPLING,
            TINY.vocab_size,
        )
        pieces.append(logits)
        start += size
    streamed = torch.cat(pieces, 1)
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, rtol=1e-4, atol=1e-4)


def test_state_is_carried_not_reset(exported: tuple[ASRModel, Path]) -> None:
    """The same chunk twice gives different logits (the state moved on), and a fresh state gives the first again."""
    _, path = exported
    onnx_model = OnnxModel(path)
    feats = torch.randn(1, SUBSAMPLING * 3, N_MELS)
    state = onnx_model.init_state(1)
    first, _ = onnx_model.chunk(feats, state)
    assert state.ssm.any() and state.conv.any()
    second, _ = onnx_model.chunk(feats, state)
    assert not torch.allclose(first, second)
    again, _ = onnx_model.chunk(feats, onnx_model.init_state(1))
    torch.testing.assert_close(again, first)
    with pytest.raises(ValueError, match="multiple of 4"):
        onnx_model.chunk(feats[:, :5], state)
    with pytest.raises(ValueError, match="feats hold 2 streams, the state 1"):
        onnx_model.chunk(torch.cat([feats, feats]), state)


def test_the_file_carries_the_config(exported: tuple[ASRModel, Path]) -> None:
    """The model's dims and its own CMVN (the graph's, not the stale config's), and no int8 list (float32 graph)."""
    model, path = exported
    config = OnnxModel(path).config
    assert config.dims == model.dims and config.vocab == VOCAB and config.int8_weights == ()
    torch.testing.assert_close(config.cmvn.mean, model.cmvn.mean)
    torch.testing.assert_close(config.cmvn.istd, model.cmvn.istd)
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)


def test_bad_files_get_clear_errors(exported: tuple[ASRModel, Path], tmp_path: Path) -> None:
    _, path = exported
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf" * 10)
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        OnnxModel(corrupt)
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelLoadError, match="no 'asr_config' metadata"):
        OnnxModel(tmp_path / "bare.onnx")
    for name, text, error in [
        ("list.onnx", "[1, 2]", "not a JSON object"),
        ("json.onnx", "{not json", "not valid JSON"),
        ("dims.onnx", _with_dims(path, n_layers=TINY.n_layers + 1), "input conv is"),
    ]:
        bad = onnx.load(str(path))
        next(p for p in bad.metadata_props if p.key == "asr_config").value = text
        onnx.save(bad, str(tmp_path / name))
        with pytest.raises(ModelLoadError, match=error):
            OnnxModel(tmp_path / name)
    config = OnnxModel(path).config
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        export_onnx(ASRModel(TINY).to(torch.bfloat16), config, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="are not the model's"):
        export_onnx(ASRModel(replace(TINY, n_layers=1)), config, tmp_path / "x.onnx")


def _with_dims(path: Path, **changes: int) -> str:
    """The file's `asr_config` metadata with some dims changed."""
    raw = OnnxModel(path).config.to_json()
    raw["dims"] |= changes
    return json.dumps(raw)


def test_transcribe_file_takes_the_exported_model(exported: tuple[ASRModel, Path], speech_wav: Path) -> None:
    model, path = exported
    by_torch = transcribe_file(speech_wav, model, chunk_ms=120)
    by_onnx = transcribe_file(speech_wav, OnnxModel(path), chunk_ms=120)
    assert by_torch.text  # the tiny random model writes noise, but some
    assert [s.text for s in by_onnx.segments] == [s.text for s in by_torch.segments]
    assert [s.start for s in by_onnx.segments] == [s.start for s in by_torch.segments]


def test_cli_export_checks_the_file(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    code, printed, err = _run(capsys, "export", out, "--model", tiny_model_dir)
    assert code == 0, err
    difference = float(printed.rsplit("max |difference| ", 1)[1])
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and difference < 1e-4  # no partial file left
    assert OnnxModel(out).config.dims == TINY


def test_cli_export_fails_past_its_tolerance(
    capsys, monkeypatch: pytest.MonkeyPatch, exported: tuple[ASRModel, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The check after writing: a graph that differs by more than --tolerance exits 1. Here the file written is
    another model's export (the fixture's, whose CMVN differs from the directory's model)."""
    monkeypatch.setattr(export.onnx, "export_onnx", lambda model, config, out: shutil.copy(exported[1], out))
    code, _, err = _run(capsys, "export", tmp_path / "other.onnx", "--model", tiny_model_dir)
    assert code == 1 and "differs by more than 0.001" in err and (tmp_path / "other.onnx").is_file()
    code, _, err = _run(capsys, "export", tmp_path, "--model", tiny_model_dir)
    assert code == 2 and "give a file name in an existing directory" in err


def test_cli_transcribe_onnx(capsys, exported: tuple[ASRModel, Path], speech_wav: Path, tmp_path: Path) -> None:
    model, path = exported
    code, _, err = _run(capsys, "transcribe", speech_wav, "--onnx", path, "-o", tmp_path, "-f", "json", "-q")
    assert code == 0, err
    text = json.loads((tmp_path / "speech.json").read_text())["text"]
    assert text == transcribe_file(speech_wav, model).text
    code, _, err = _run(capsys, "transcribe", speech_wav, "--onnx", path, "--model", tmp_path, "-q")
    assert code == 2 and "give one of them" in err
    code, _, err = _run(capsys, "transcribe", speech_wav, "--onnx", path, "--dtype", "bfloat16", "-q")
    assert code == 2 and "--dtype bfloat16 does not apply" in err
    code, _, err = _run(capsys, "transcribe", speech_wav, "--onnx", tmp_path / "none.onnx", "-q")
    assert code == 2 and "ONNX model not found" in err
