"""Shared fixtures: tiny random models and synthetic audio (tests never need trained weights)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.checkpoint import save_model
from asr.model import ASRModel, ModelDimensions

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
