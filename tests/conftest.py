"""Shared fixtures: tiny random models and synthetic audio (tests never need trained weights)."""

from __future__ import annotations

import os

# Triton kernels run on the CPU in CI; the gpu-marked tests run without it on a GPU machine
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import triton.language as tl
import triton.runtime.interpreter as triton_interpreter

from asr.checkpoint import save_model
from asr.model import ASRModel, ModelDimensions


def _patch_lang_tensor(tensor, scope, _patch=triton_interpreter._patch_lang_tensor):
    """Triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses, so kernel loops with a
    runtime bound fail under TRITON_INTERPRET=1 (triton-lang/triton#9171); this is the fix proposed there."""
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


triton_interpreter._patch_lang_tensor = _patch_lang_tensor


@pytest.fixture
def bf16_as_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6's interpreter stores bfloat16 as uint16 bit patterns: its tl.dot multiplies the bit patterns
    (triton-lang/triton#11584), and its float32 -> bfloat16 cast rounds toward zero where the GPU and PyTorch round
    to nearest even. Both are patched here, so that the bf16 kernels can be held to PyTorch's rounding."""
    builder = triton_interpreter.InterpreterBuilder
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def as_float32(h):
        if h.dtype != tl.bfloat16:
            return h
        return triton_interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def cast(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast_impl(self, src, dst_type)
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).bfloat16().view(torch.int16)
        return triton_interpreter.TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)

    monkeypatch.setattr(
        builder, "create_dot", lambda self, a, b, *rest: create_dot(self, as_float32(a), as_float32(b), *rest)
    )
    monkeypatch.setattr(builder, "cast_impl", cast)


TINY = ModelDimensions(d_model=32, n_layers=2, d_state=8, head_dim=8, n_groups=2, frontend_channels=4)


def bursty_audio(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Noise and tone bursts separated by silences: speech-like structure without a TTS engine."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    envelope = (np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) > 0.2).astype(np.float32)
    tone = np.sin(2 * np.pi * rng.uniform(120, 300) * t) * 0.3
    return ((tone + rng.normal(0, 0.1, n)) * envelope).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_model() -> ASRModel:
    torch.manual_seed(1234)
    return ASRModel(TINY).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: ASRModel) -> Path:
    return save_model(tiny_model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few seconds of real synthesized speech at 22.05 kHz (espeak-ng's native rate)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run `make setup` (it installs the apt package espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog. Then it rests for a while."
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
    return path


@pytest.fixture
def write_audio(tmp_path: Path):
    """write_audio(name, samples (n,) or (n, ch), sr, **soundfile kwargs) -> path."""

    def write(name: str, samples: np.ndarray, sr: int = 16000, **kwargs) -> Path:
        path = tmp_path / name
        sf.write(str(path), samples, sr, **kwargs)
        return path

    return write


@pytest.fixture(scope="session")
def sentences_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 short distinct sentences: enough that every split gets some."""
    words = ["RED", "GREEN", "BLUE", "SMALL", "LARGE", "HOUSE", "RIVER", "STONE", "BIRD", "LIGHT"]
    lines = [f"THE {words[i % 10]} {words[(i // 10) % 10]} {words[(i // 100) % 10]} NUMBER {i}" for i in range(400)]
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory, sentences_file: Path) -> Path:
    """A 3-gram KenLM model of `sentences_file` (built with the lmplz that `make setup` builds)."""
    from asr.lm import build_lm, lm_sentences

    out = tmp_path_factory.mktemp("lm") / "lm"
    build_lm(lm_sentences([sentences_file]), out, order=3, prune=(0,))
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory, sentences_file: Path) -> Path:
    """A few espeak-ng utterances in the LibriSpeech layout, with a train.jsonl manifest."""
    from asr.synth import build_corpus

    root = tmp_path_factory.mktemp("corpus") / "LibriSpeech" / "train-tiny"
    report = build_corpus(root, 0.006, sentences_file, "train", seed=0, jobs=2, engines=("espeak",), progress=False)
    assert report.utterances >= 4 and not report.failed
    return root
