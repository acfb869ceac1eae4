"""Audio input: any file soundfile reads (WAV, FLAC, OGG/Opus, MP3, ...), at any rate, any channels.

Audio is read in blocks, mixed down to mono and resampled to 16 kHz by a stateful resampler, so
memory stays flat however long the file is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

from asr.features import SAMPLE_RATE


class AudioError(Exception):
    """An audio file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def audio_info(path: str | Path) -> AudioInfo:
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: contains no audio")
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames))


class StreamingResampler:
    """Stateful windowed-sinc resampler to 16 kHz, exact against `torchaudio.functional.resample`.

    It applies torchaudio's own kernel (from `torchaudio.transforms.Resample`) block by block,
    keeping the input the next output block still needs. `flush()` ends the stream the way the
    offline function ends a signal (zero padding, output length ceil(n * new / orig)).
    """

    def __init__(self, orig_rate: int, new_rate: int = SAMPLE_RATE) -> None:
        if orig_rate <= 0 or new_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
        self.passthrough = orig_rate == new_rate
        gcd = math.gcd(orig_rate, new_rate)  # torchaudio builds the kernel for the reduced ratio
        self.orig, self.new = orig_rate // gcd, new_rate // gcd
        self.kernel = torch.zeros(self.new, 1, self.orig)  # identity rates never use it
        self.width = 0
        if not self.passthrough:
            resample = torchaudio.transforms.Resample(orig_rate, new_rate)
            self.kernel = resample.kernel.float()  # (new, 1, 2 * width + orig)
            self.width = resample.width
        self.buffer = torch.zeros(self.width)  # the offline function's left padding
        self.samples_in = 0
        self.samples_out = 0

    def _emit(self) -> torch.Tensor:
        span = self.kernel.shape[-1]
        blocks = (self.buffer.numel() - span) // self.orig + 1 if self.buffer.numel() >= span else 0
        if blocks == 0:
            return torch.zeros(0)
        used = self.buffer[: (blocks - 1) * self.orig + span]
        out = F.conv1d(used.view(1, 1, -1), self.kernel, stride=self.orig).transpose(1, 2).reshape(-1)
        self.buffer = self.buffer[blocks * self.orig :]
        return out

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """samples (N,) float32 at the input rate -> (M,) at the output rate."""
        self.samples_in += samples.numel()
        if self.passthrough:
            self.samples_out += samples.numel()
            return samples
        self.buffer = torch.cat([self.buffer, samples.float()])
        out = self._emit()
        self.samples_out += out.numel()
        return out

    def flush(self) -> torch.Tensor:
        """Final output once the input has ended."""
        if self.passthrough:
            return torch.zeros(0)
        self.buffer = torch.cat([self.buffer, torch.zeros(self.width + self.orig)])
        out = self._emit()
        target = -(-self.samples_in * self.new // self.orig)  # ceil
        out = out[: max(0, target - self.samples_out)]
        self.samples_out += out.numel()
        return out


def _to_mono(block: np.ndarray) -> torch.Tensor:
    """block (frames, channels) -> (frames,) float32, channels averaged."""
    return torch.from_numpy(np.ascontiguousarray(block.mean(axis=1, dtype=np.float32)))


def stream_audio(path: str | Path, block_s: float = 1.0) -> Iterator[torch.Tensor]:
    """Yield the file as 16 kHz mono float32 pieces of about `block_s` seconds each.

    Raises AudioError for a file that cannot be opened or decoded, also part way through.
    """
    info = audio_info(path)
    resampler = StreamingResampler(info.sample_rate)
    block = max(1, round(block_s * info.sample_rate))
    try:
        with sf.SoundFile(str(info.path)) as f:
            for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):
                yield resampler.accept(_to_mono(data))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{info.path}: decoding failed ({e})") from e
    yield resampler.flush()


def load_audio(path: str | Path) -> torch.Tensor:
    """The whole file as 16 kHz mono float32 (N,). For short files; long ones use stream_audio."""
    return torch.cat(list(stream_audio(path, block_s=30.0)))
