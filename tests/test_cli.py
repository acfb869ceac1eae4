import json
from pathlib import Path

import numpy as np
import pytest
import torch

import streaming.workers
from asr.checkpoint import DTYPES, load_model
from asr.cli import build_parser, build_server, main
from asr.transcribe import transcribe_file
from tests.captions import parse_srt, parse_vtt
from tests.conftest import bursty_audio


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_all_formats_are_written_and_parse(capsys, tiny_model_dir: Path, speech_wav: Path, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "transcribe", speech_wav, "--model", tiny_model_dir, "-o", tmp_path, "-q")
    assert code == 0, err
    data = json.loads((tmp_path / "speech.json").read_text())
    assert data["audio"] == str(speech_wav) and data["duration"] > 3 and data["text"]
    for seg in data["segments"]:
        assert set(seg) == {"id", "start", "end", "text", "words"} and seg["start"] < seg["end"]
        for w in seg["words"]:
            assert set(w) == {"word", "start", "end", "conf"} and 0 <= w["conf"] <= 1 and w["start"] < w["end"]
    srt = parse_srt((tmp_path / "speech.srt").read_text())
    vtt = parse_vtt((tmp_path / "speech.vtt").read_text())
    assert srt == vtt and " ".join(" ".join(lines) for *_, lines in srt) == data["text"]
    assert (tmp_path / "speech.txt").read_text().split() == data["text"].split()


def test_chunk_size_does_not_change_the_result(capsys, tiny_model_dir: Path, speech_wav: Path, tmp_path) -> None:
    results = []
    for ms in (40, 2000):
        out = tmp_path / str(ms)
        assert (
            _run(
                capsys,
                "transcribe",
                speech_wav,
                "--model",
                tiny_model_dir,
                "-o",
                out,
                "-f",
                "json",
                "--chunk-ms",
                ms,
                "-q",
            )[0]
            == 0
        )
        results.append(json.loads((out / "speech.json").read_text()))
    assert results[0]["segments"] == results[1]["segments"] and results[0]["text"]


def test_bad_files_are_reported_and_others_still_transcribed(
    capsys, tiny_model_dir: Path, tmp_path: Path, write_audio
) -> None:
    good = write_audio("good.flac", np.stack([bursty_audio(2.0, 8000)] * 3, 1), 8000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    empty = tmp_path / "empty.ogg"
    empty.touch()
    text = tmp_path / "readme.mp3"
    text.write_text("not audio\n")
    out = tmp_path / "out"
    code, _, err = _run(
        capsys, "transcribe", corrupt, good, empty, text, "--model", tiny_model_dir, "-o", out, "-f", "txt", "-q"
    )
    assert code == 1
    lines = err.strip().splitlines()
    for bad in (corrupt, empty, text):
        assert sum(str(bad) in line for line in lines) == 1
    assert lines[-1] == "asr: 3 of 4 files failed"
    assert [p.name for p in out.iterdir()] == ["good.txt"]


def test_model_problems_exit_2(capsys, monkeypatch, tmp_path: Path, speech_wav: Path, tiny_model_dir: Path) -> None:
    code, _, err = _run(capsys, "transcribe", speech_wav, "--model", tmp_path / "missing")
    assert code == 2 and err.startswith("asr: error:") and "model directory not found" in err
    monkeypatch.setattr("asr.cli.DEFAULT_MODEL_DIR", tmp_path / "no-default")
    code, _, err = _run(capsys, "transcribe", speech_wav)
    assert code == 2 and "pass --model DIR" in err
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, err = _run(capsys, "transcribe", speech_wav, "--model", tiny_model_dir, "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


def test_progress_and_segments_are_shown(capsys, tiny_model_dir: Path, speech_wav: Path, tmp_path: Path) -> None:
    code, out, err = _run(capsys, "transcribe", speech_wav, "--model", tiny_model_dir, "-o", tmp_path, "-f", "srt")
    assert code == 0
    assert out.startswith("[00:00:0") and "-->" in out
    assert "wrote" in err and str(tmp_path / "speech.srt") in err


def test_init_model_and_usage_errors(capsys, tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "init-model", tmp_path / "m", "--d-model", 64, "--layers", 1, "--head-dim", 16)
    assert code == 0 and "parameters" in out and (tmp_path / "m" / "model.safetensors").is_file()
    code, _, err = _run(capsys, "init-model", tmp_path / "bad", "--d-model", 60, "--head-dim", 16)
    assert code == 2 and "head_dim" in err
    with pytest.raises(SystemExit) as e:
        main(["transcribe", "x.wav", "--chunk-ms", "0"])
    assert e.value.code == 2


def test_convert_writes_each_format_and_refuses_its_input(
    capsys, tiny_model_dir: Path, speech_wav: Path, tmp_path: Path
) -> None:
    sizes = {}
    for weights in ("float32", "float16", "int8"):
        code, out, err = _run(capsys, "convert", tiny_model_dir, tmp_path / weights, "--weights", weights)
        assert code == 0 and f"{weights} weights" in out, err
        sizes[weights] = (tmp_path / weights / "model.safetensors").stat().st_size
    # the tiny model keeps most of its (small) tensors float16
    assert sizes["int8"] < 0.8 * sizes["float16"] < 0.6 * sizes["float32"]
    code, _, err = _run(capsys, "transcribe", speech_wav, "--model", tmp_path / "int8", "-o", tmp_path, "-q")
    assert code == 0 and (tmp_path / "speech.txt").is_file(), err
    code, _, err = _run(capsys, "convert", tiny_model_dir, tiny_model_dir)
    assert code == 2 and "must differ" in err


def test_dtype_runs_the_model_in_bfloat16(capsys, tiny_model_dir: Path, speech_wav: Path, tmp_path: Path) -> None:
    """`--dtype bfloat16` loads the model in bfloat16: `asr transcribe` writes what `transcribe_file` gives with the
    model loaded so, and its word confidences differ from float32's (the dtype reached the model)."""
    words = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        argv = ("transcribe", speech_wav, "--model", tiny_model_dir, "-o", out, "-f", "json", "-q", "--dtype", dtype)
        assert _run(capsys, *argv)[0] == 0
        data = json.loads((out / "speech.json").read_text())
        model, _ = load_model(tiny_model_dir, dtype=DTYPES[dtype])
        assert data["text"] == transcribe_file(speech_wav, model).text and data["text"]
        words[dtype] = [w for seg in data["segments"] for w in seg["words"]]
    assert [w["conf"] for w in words["float32"]] != [w["conf"] for w in words["bfloat16"]]
    with pytest.raises(SystemExit):
        main(["transcribe", str(speech_wav), "--dtype", "float16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_serve_dtype_reaches_the_model_and_the_ready_message(tiny_model_dir: Path) -> None:
    """`asr serve --dtype bfloat16` builds its server on a bfloat16 model and names the dtype in the `ready`
    message's model info (docs/protocol.md)."""
    for dtype in ("float32", "bfloat16"):
        args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--no-lm",
                                          "--port", "0", "--dtype", dtype])  # fmt: skip
        server = build_server(args)
        assert server.model_info["dtype"] == dtype
        assert {p.dtype for p in server.model.parameters()} == {DTYPES[dtype]}


def test_serve_dtype_reaches_the_step_process(monkeypatch, tiny_model_dir: Path) -> None:
    """`asr serve --workers 2 --step-process --dtype bfloat16` asks its step process for a bfloat16 model."""
    asked = []
    monkeypatch.setattr(streaming.workers, "run_workers", lambda build, args, n, ready, step: asked.append(step) or 0)
    for dtype in ("bfloat16", "float32"):
        argv = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--no-lm", "--workers", "2"]
        assert main([*argv, "--max-streams", "4", "--step-process", "--dtype", dtype]) == 0
    assert [step.dtype for step in asked] == [torch.bfloat16, torch.float32]
