"""Waveform augmentations for training, each switchable in `AugmentConfig`.

Contract: audio in is 16 kHz mono float32 (N,), audio out is 16 kHz mono float32. Every
augmentation keeps the length except speed perturbation, which gives about N / factor.
Randomness comes only from the numpy Generator passed in, so results are reproducible.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.features import SAMPLE_RATE

Rng = np.random.Generator


@dataclass(frozen=True)
class AugmentConfig:
    """Probability of applying each augmentation to an utterance (0 switches it off)."""

    speed: float = 0.5
    speed_factors: tuple[float, ...] = (0.9, 1.1)
    noise: float = 0.4
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_share: float = 0.3  # of the noise draws, the share that is babble
    reverb: float = 0.2
    rt60_s: tuple[float, float] = (0.15, 0.8)
    telephone: float = 0.1
    codec: float = 0.1


def speed_perturb(audio: torch.Tensor, factor: float) -> torch.Tensor:
    """Play `factor` times faster (tempo and pitch), as Kaldi's speed perturbation: N -> ~N / factor."""
    if factor == 1.0:
        return audio
    return AF.resample(audio, round(SAMPLE_RATE * factor), SAMPLE_RATE)


def _power(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean().clamp_min(1e-10)


def fast_fft_len(n: int) -> int:
    """The smallest 5-smooth length (2^a 3^b 5^c) >= n: FFTs of such lengths are fast, while an utterance's own
    length can be a large prime (an FFT of 86,011 samples took 10x as long as one of 86,016)."""
    best = 1 << max(0, n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def colored_noise(n: int, exponent: float, rng: Rng) -> torch.Tensor:
    """Gaussian noise with a 1/f^exponent power spectrum: 0 white, 1 pink, 2 brown. Drawn in the frequency domain
    (complex Gaussian bins, as white noise's spectrum is) and made by one float32 inverse FFT at a fast length,
    cut to n. Its scale is arbitrary: `add_noise` sets the level."""
    m = fast_fft_len(n)
    freqs = np.fft.rfftfreq(m)
    freqs[0] = freqs[1] if m > 1 else 1.0
    real, imag = (torch.from_numpy(rng.standard_normal(freqs.size, dtype=np.float32)) for _ in range(2))
    slope = torch.from_numpy((freqs ** (-exponent / 2)).astype(np.float32))
    return torch.fft.irfft(torch.complex(real, imag) * slope, m)[:n].contiguous()


def add_noise(audio: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Mix `noise` (tiled or cut to length) at the given signal-to-noise ratio."""
    if noise.numel() < audio.numel():
        noise = noise.repeat(audio.numel() // noise.numel() + 1)
    noise = noise[: audio.numel()]
    scale = torch.sqrt(_power(audio) / (_power(noise) * 10 ** (snr_db / 10)))
    return audio + scale * noise


def babble(others: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Several other utterances summed at equal power: background chatter of length n."""
    mixture = torch.zeros(n)
    for other in others:
        tiled = other.repeat(n // max(1, other.numel()) + 1)[:n]
        mixture += tiled / _power(tiled).sqrt()
    return mixture


def room_impulse_response(rt60: float, rng: Rng, length_s: float | None = None) -> torch.Tensor:
    """A synthetic RIR: a direct path, then exponentially decaying noise reaching -60 dB at rt60,
    with a direct-to-reverberant energy ratio drawn from 0-10 dB."""
    n = int((length_s or rt60) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # ln(1000) = 6.9078: -60 dB
    delay = int(rng.uniform(0.002, 0.01) * SAMPLE_RATE)  # first reflections arrive a little later
    tail[:delay] = 0
    drr_db = rng.uniform(0.0, 10.0)
    tail *= np.sqrt(10 ** (-drr_db / 10) / max((tail**2).sum(), 1e-12))
    rir = np.concatenate([[1.0], tail])
    return torch.from_numpy((rir / np.sqrt((rir**2).sum())).astype(np.float32))


def reverberate(audio: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve with `rir`, keep the original length and peak level (FFT convolution at a fast length)."""
    m = fast_fft_len(audio.numel() + rir.numel() - 1)
    wet = torch.fft.irfft(torch.fft.rfft(audio, m) * torch.fft.rfft(rir, m), m)[: audio.numel()]
    return wet * (audio.abs().max() / wet.abs().max().clamp_min(1e-8))


def telephone(audio: torch.Tensor) -> torch.Tensor:
    """Narrowband telephone: 300-3400 Hz band, 8 kHz sampling and mu-law, back to 16 kHz."""
    band = AF.highpass_biquad(AF.lowpass_biquad(audio, SAMPLE_RATE, 3400.0), SAMPLE_RATE, 300.0)
    narrow = AF.resample(band, SAMPLE_RATE, 8000)
    peak = narrow.abs().max().clamp_min(1e-8)
    narrow = AF.mu_law_decoding(AF.mu_law_encoding(narrow / peak, 256), 256) * peak
    return AF.resample(narrow, 8000, SAMPLE_RATE)[: audio.numel()].contiguous()


CODECS = (("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III"))


def codec_round_trip(audio: torch.Tensor, rng: Rng) -> torch.Tensor:
    """Encode with a lossy codec (Vorbis, Opus or MP3, in memory) and decode, keeping the length.

    Opus and MP3 need 48 kHz or a standard rate; soundfile handles 16 kHz for all three.
    """
    fmt, subtype = CODECS[int(rng.integers(len(CODECS)))]
    buffer = io.BytesIO()
    sf.write(buffer, audio.clamp(-1, 1).numpy(), SAMPLE_RATE, format=fmt, subtype=subtype)
    buffer.seek(0)
    decoded, _ = sf.read(buffer, dtype="float32")
    out = torch.zeros_like(audio)
    n = min(audio.numel(), len(decoded))
    out[:n] = torch.from_numpy(decoded[:n])
    return out


class Augmenter:
    """Applies the configured augmentations in a fixed order: speed, reverb, noise, telephone, codec.

    `babble_source(rng) -> list of tensors` supplies other utterances for babble noise.
    """

    def __init__(self, config: AugmentConfig, babble_source: Callable[[Rng], list[torch.Tensor]] | None = None) -> None:
        self.config = config
        self.babble_source = babble_source

    def __call__(self, audio: torch.Tensor, rng: Rng) -> torch.Tensor:
        c = self.config
        if rng.random() < c.speed:
            audio = speed_perturb(audio, float(rng.choice(c.speed_factors)))
        if rng.random() < c.reverb:
            audio = reverberate(audio, room_impulse_response(rng.uniform(*c.rt60_s), rng))
        if rng.random() < c.noise:
            audio = add_noise(audio, self._noise(audio.numel(), rng), rng.uniform(*c.snr_db))
        if rng.random() < c.telephone:
            audio = telephone(audio)
        if rng.random() < c.codec:
            audio = codec_round_trip(audio, rng)
        return audio

    def _noise(self, n: int, rng: Rng) -> torch.Tensor:
        if self.babble_source is not None and rng.random() < self.config.babble_share:
            return babble(self.babble_source(rng), n)
        return colored_noise(n, float(rng.choice([0.0, 1.0, 2.0])), rng)
