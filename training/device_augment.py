"""Reverberation and additive noise for a whole padded batch on the training device.

The same augmentations as `asr.augment`'s reverb and noise (synthetic room impulse responses; white, pink or
brown noise or babble at 5-30 dB SNR), drawn per utterance from the run's device generator, so that the
loader workers' CPUs are spared their FFTs (`data.augment.on_device`). Babble mixes other utterances of the
same batch, each repeated to the row's length. Padding stays zero, so the batch's lengths stay valid. No step
waits for the device. Every row is reverberated and noised and the chosen ones kept (`torch.where`): more FFT
work than the chosen rows need, but no row count read back to the host.

One difference from the workers' order (speed, reverb, noise, telephone, codec): the workers' telephone band
and codec now come before the device's reverb and noise, so 5-7 % of utterances get full-band noise over
narrowband or coded speech.
"""

from __future__ import annotations

import math

import torch

from asr.augment import AugmentConfig, fast_fft_len
from asr.features import SAMPLE_RATE

RT60_S = AugmentConfig.rt60_s  # the workers' ranges
SNR_DB = AugmentConfig.snr_db
MAX_BABBLE = 6  # other utterances summed, 3 to this many


def _uniform(shape: tuple[int, ...], low: float, high: float, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=like.device)


def _mean_power(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean square over each row's valid samples: x (B, N), valid (B, N) bool -> (B, 1)."""
    total = (x.square() * valid).sum(-1, keepdim=True)
    return (total / valid.sum(-1, keepdim=True).clamp_min(1)).clamp_min(1e-10)


def room_impulse_responses(b: int, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, R) synthetic RIRs as `asr.augment.room_impulse_response`: a direct path, then noise decaying to
    -60 dB at each row's rt60 (and cut there), arriving 2-10 ms late, 0-10 dB below the direct path."""
    n = int(RT60_S[1] * SAMPLE_RATE)
    t = torch.arange(n, device=like.device) / SAMPLE_RATE
    rt60 = _uniform((b, 1), *RT60_S, like, g)
    delay = _uniform((b, 1), 0.002, 0.01, like, g)
    tail = torch.randn(b, n, generator=g, device=like.device) * torch.exp(-math.log(1000.0) * t / rt60)
    tail = tail * ((t >= delay) & (t < rt60))
    drr_db = _uniform((b, 1), 0.0, 10.0, like, g)
    tail = tail * torch.sqrt(10 ** (-drr_db / 10) / tail.square().sum(-1, keepdim=True).clamp_min(1e-12))
    rir = torch.cat([torch.ones(b, 1, device=like.device), tail], dim=1)
    return rir / rir.square().sum(-1, keepdim=True).sqrt()


def reverberate(audio: torch.Tensor, valid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """audio (B, N) convolved with a RIR each, cut to each row's length and scaled back to its peak."""
    b, n = audio.shape
    rir = room_impulse_responses(b, audio, g)
    m = fast_fft_len(n + rir.shape[1] - 1)
    wet = torch.fft.irfft(torch.fft.rfft(audio, m) * torch.fft.rfft(rir, m), m)[:, :n] * valid
    peak = audio.abs().amax(-1, keepdim=True) / wet.abs().amax(-1, keepdim=True).clamp_min(1e-8)
    return wet * peak


def colored_noise(b: int, n: int, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, N) Gaussian noise with a 1/f^e power spectrum, e drawn per row from {0, 1, 2} (white, pink, brown)."""
    m = fast_fft_len(n)
    freqs = torch.fft.rfftfreq(m, device=like.device)
    freqs[0] = freqs[1] if m > 1 else 1.0
    exponent = torch.randint(0, 3, (b, 1), generator=g, device=like.device).float()
    bins = torch.complex(*(torch.randn(b, freqs.numel(), generator=g, device=like.device) for _ in range(2)))
    return torch.fft.irfft(bins * freqs.pow(-exponent / 2), m)[:, :n]


def babble(audio: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, N): for each row, 3 to MAX_BABBLE other rows of the batch (the next ones, cyclically) at equal power,
    each repeated to the full width as `asr.augment.babble` repeats a shorter utterance."""
    b, n = audio.shape
    count = torch.randint(3, MAX_BABBLE + 1, (b, 1), generator=g, device=audio.device)
    unit = audio / _mean_power(audio, valid).sqrt()
    positions = torch.arange(n, device=audio.device)
    mixture = torch.zeros_like(audio)
    for k in range(1, min(MAX_BABBLE, b - 1) + 1):
        other_lengths = lengths.roll(-k).clamp_min(1)[:, None]
        tiled = unit.roll(-k, dims=0).gather(1, (positions % other_lengths).expand(b, n))
        mixture = mixture + tiled * (k <= count)
    return mixture


def add_noise(
    audio: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, babble_share: float, g: torch.Generator
) -> torch.Tensor:
    """audio (B, N) plus colored noise or babble (with probability `babble_share`) at 5-30 dB SNR each."""
    b, n = audio.shape
    noise = colored_noise(b, n, audio, g)
    if b > 1:
        use_babble = torch.rand(b, 1, generator=g, device=audio.device) < babble_share
        noise = torch.where(use_babble, babble(audio, lengths, valid, g), noise)
    noise = noise * valid
    snr_db = _uniform((b, 1), *SNR_DB, audio, g)
    scale = torch.sqrt(_mean_power(audio, valid) / (_mean_power(noise, valid) * 10 ** (snr_db / 10)))
    return audio + scale * noise


@torch.no_grad()
def augment_batch(
    audio: torch.Tensor, lengths: torch.Tensor, reverb: float, noise: float, babble_share: float, g: torch.Generator
) -> torch.Tensor:
    """audio (B, N) zero-padded on the device, lengths (B,) samples on the device -> augmented audio (B, N):
    each row reverberated with probability `reverb`, then noised with probability `noise`."""
    b, n = audio.shape
    valid = torch.arange(n, device=audio.device) < lengths[:, None]
    if reverb > 0:
        chosen = torch.rand(b, 1, generator=g, device=audio.device) < reverb
        audio = torch.where(chosen, reverberate(audio, valid, g), audio)
    if noise > 0:
        chosen = torch.rand(b, 1, generator=g, device=audio.device) < noise
        audio = torch.where(chosen, add_noise(audio, lengths, valid, babble_share, g), audio)
    return audio
