"""Log-mel features: constants, the offline extractor, the exact streaming extractor and global CMVN.

Every feature constant is named once here; everything else (frame counts, the encoder frame
rate after subsampling, timestamps) is derived from these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio

SAMPLE_RATE = 16_000
N_MELS = 80
WINDOW_MS = 25
HOP_MS = 10
SUBSAMPLING = 4  # the model's causal front end turns 10 ms frames into 40 ms frames
LOG_FLOOR = 1e-6  # power floor before the log: digital silence stays finite

WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_MS // 1000  # 400
HOP_SAMPLES = SAMPLE_RATE * HOP_MS // 1000  # 160
N_FFT = WINDOW_SAMPLES
FEATURE_RATE = SAMPLE_RATE / HOP_SAMPLES  # 100 feature frames per second
ENCODER_FRAME_SAMPLES = HOP_SAMPLES * SUBSAMPLING  # 640
ENCODER_FRAME_S = ENCODER_FRAME_SAMPLES / SAMPLE_RATE  # 0.04 s per model output frame


@dataclass(frozen=True)
class FeatureSettings:
    """The settings a checkpoint was trained with; loading refuses a mismatch with this code."""

    sample_rate: int = SAMPLE_RATE
    n_mels: int = N_MELS
    window_ms: int = WINDOW_MS
    hop_ms: int = HOP_MS
    subsampling: int = SUBSAMPLING
    log_floor: float = LOG_FLOOR


def num_frames(n_samples: int) -> int:
    """Number of complete feature frames in `n_samples` (no padding: frames are causal)."""
    if n_samples < WINDOW_SAMPLES:
        return 0
    return 1 + (n_samples - WINDOW_SAMPLES) // HOP_SAMPLES


def frame_lengths(sample_lengths: torch.Tensor) -> torch.Tensor:
    """`num_frames` for a tensor of sample counts."""
    frames = torch.div(sample_lengths - WINDOW_SAMPLES, HOP_SAMPLES, rounding_mode="floor") + 1
    return frames.clamp_min(0)


def mel_filters() -> torch.Tensor:
    """The mel filter bank (N_FFT // 2 + 1, N_MELS): power spectrum bins -> mel bands (Slaney scale and norm)."""
    return torchaudio.functional.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1,
        f_min=0.0,
        f_max=SAMPLE_RATE / 2,
        n_mels=N_MELS,
        sample_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )


class LogMel(torch.nn.Module):
    """Offline extractor. audio (..., N) float32 in [-1, 1] -> log-mel (..., T, N_MELS).

    Frame t covers samples [t * HOP_SAMPLES, t * HOP_SAMPLES + WINDOW_SAMPLES): no centring, so a
    frame never looks at audio after its own window and streaming can reproduce it exactly.
    The mel projection is a batched product with one frame per batch entry, so each frame's
    arithmetic is the same whatever the number of frames (a plain matmul switches kernels with
    the row count and would differ from streaming in the last bit).
    """

    def __init__(self) -> None:
        super().__init__()
        self.spectrogram = torchaudio.transforms.Spectrogram(
            n_fft=N_FFT, win_length=WINDOW_SAMPLES, hop_length=HOP_SAMPLES, center=False, power=2.0
        )
        self.register_buffer("fbanks", mel_filters(), persistent=False)

    def frames(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (T, WINDOW_SAMPLES), one frame's samples each (see `Framer`) -> log-mel (T, N_MELS).
        Bit-identical to the same frames of `forward` over the whole audio (each frame is computed alone)."""
        if windows.shape[0] == 0:
            return windows.new_zeros(0, N_MELS)
        return self(windows).reshape(windows.shape[0], N_MELS)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        lead = audio.shape[:-1]
        if audio.shape[-1] < WINDOW_SAMPLES:
            return audio.new_zeros(*lead, 0, N_MELS)
        power = self.spectrogram(audio).transpose(-1, -2)  # (..., T, n_freqs)
        frames = power.reshape(-1, 1, power.shape[-1])
        mel = torch.bmm(frames, self.fbanks.expand(frames.shape[0], *self.fbanks.shape))
        return mel.reshape(*lead, power.shape[-2], N_MELS).clamp_min(LOG_FLOOR).log()


class BatchLogMel(torch.nn.Module):
    """For training: `LogMel`'s features (within float32 rounding, not bit for bit, so never for streaming) of a
    padded batch, as one product of all frames with a windowed real-DFT matrix, then one with the mel filters:
    no FFT plan per batch shape. audio (..., N) -> log-mel (..., T, N_MELS).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fbanks", mel_filters(), persistent=False)
        n_freqs = N_FFT // 2 + 1
        t = torch.arange(N_FFT, dtype=torch.float64)[:, None]
        k = torch.arange(n_freqs, dtype=torch.float64)[None, :]
        angle = 2 * torch.pi * t * k / N_FFT
        window = torch.hann_window(WINDOW_SAMPLES, periodic=True, dtype=torch.float64)[:, None]
        basis = torch.cat([angle.cos(), angle.sin()], dim=1) * window  # (N_FFT, 2 * n_freqs): re, -im
        self.register_buffer("basis", basis.float(), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.shape[-1] < WINDOW_SAMPLES:
            return audio.new_zeros(*audio.shape[:-1], 0, N_MELS)
        spectrum = audio.unfold(-1, WINDOW_SAMPLES, HOP_SAMPLES) @ self.basis  # (..., T, 2 * n_freqs)
        real, imag = spectrum.chunk(2, dim=-1)
        power = real.square() + imag.square()
        return (power @ self.fbanks).clamp_min(LOG_FLOOR).log()


class Framer:
    """Cuts one stream's samples into the windows of its complete frames, carrying the leftover.

    Samples past the last complete frame wait for the next chunk; at the end of a stream they are
    dropped, exactly as the offline extractor drops them. A server frames every stream with its own
    `Framer` and extracts all their windows in one `LogMel.frames` call.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.pending = torch.zeros(0, device=self.device)

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """samples (N,) float32 -> windows of the new complete frames (T, WINDOW_SAMPLES), T >= 0."""
        buffer = torch.cat([self.pending, samples.to(self.device, torch.float32)])
        n = num_frames(buffer.numel())
        self.pending = buffer[n * HOP_SAMPLES :]
        if n == 0:
            return buffer.new_zeros(0, WINDOW_SAMPLES)
        return buffer[: (n - 1) * HOP_SAMPLES + WINDOW_SAMPLES].unfold(0, WINDOW_SAMPLES, HOP_SAMPLES)


class StreamingLogMel:
    """Streaming extractor for one stream. For any chunking of the same audio, the concatenated
    outputs of `accept` equal `LogMel` on the whole audio, bit for bit."""

    def __init__(self, extractor: LogMel | None = None, device: torch.device | str = "cpu") -> None:
        self.extractor = extractor if extractor is not None else LogMel().to(device)
        self.framer = Framer(device)

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """samples (N,) float32 -> new frames (T, N_MELS), T >= 0."""
        return self.extractor.frames(self.framer.accept(samples))


@dataclass(frozen=True)
class CMVN:
    """Global per-bin normalisation: x_norm = (x - mean) * istd. mean, istd: (N_MELS,)."""

    mean: torch.Tensor
    istd: torch.Tensor

    @classmethod
    def identity(cls) -> CMVN:
        return cls(torch.zeros(N_MELS), torch.ones(N_MELS))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "istd": self.istd.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> CMVN:
        mean, istd = torch.tensor(d["mean"]), torch.tensor(d["istd"])
        if mean.shape != (N_MELS,) or istd.shape != (N_MELS,):
            raise ValueError(f"CMVN statistics must have {N_MELS} bins, got {tuple(mean.shape)}")
        return cls(mean.float(), istd.float())


class CMVNAccumulator:
    """Accumulates per-bin sums over training features (in float64) and produces a `CMVN`."""

    def __init__(self) -> None:
        self.total = torch.zeros(N_MELS, dtype=torch.float64)
        self.total_sq = torch.zeros(N_MELS, dtype=torch.float64)
        self.count = 0

    def update(self, feats: torch.Tensor) -> None:
        """feats (..., N_MELS): every leading position counts as one frame."""
        flat = feats.detach().reshape(-1, N_MELS).to("cpu", torch.float64)
        self.total += flat.sum(0)
        self.total_sq += flat.square().sum(0)
        self.count += flat.shape[0]

    def finalize(self, min_std: float = 1e-3) -> CMVN:
        if self.count == 0:
            raise ValueError("CMVN needs at least one feature frame")
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean.square()).clamp_min(min_std**2)
        return CMVN(mean.float(), var.rsqrt().float())
