import numpy as np
import pytest
import torch

from asr.augment import (
    AugmentConfig,
    Augmenter,
    add_noise,
    babble,
    codec_round_trip,
    colored_noise,
    fast_fft_len,
    reverberate,
    room_impulse_response,
    speed_perturb,
    telephone,
)
from tests.conftest import bursty_audio

N = 16000 * 2


@pytest.fixture
def audio() -> torch.Tensor:
    return torch.from_numpy(bursty_audio(N / 16000, seed=4))


def _ok(x: torch.Tensor, n: int) -> None:
    assert x.dtype == torch.float32 and x.shape == (n,) and torch.isfinite(x).all()


def _band_energy(x: torch.Tensor, lo: float, hi: float) -> float:
    spec = torch.fft.rfft(x).abs().square()
    freqs = torch.fft.rfftfreq(x.numel(), 1 / 16000)
    return spec[(freqs >= lo) & (freqs < hi)].sum().item() / spec.sum().item()


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_length_by_the_factor(audio: torch.Tensor, factor: float) -> None:
    out = speed_perturb(audio, factor)
    assert out.dtype == torch.float32 and abs(out.numel() - N / factor) <= 2
    assert speed_perturb(audio, 1.0) is audio


@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_noise_hits_the_requested_snr(audio: torch.Tensor, snr: float) -> None:
    noise = colored_noise(N // 3, 1.0, np.random.default_rng(0))  # shorter: gets tiled
    out = add_noise(audio, noise, snr)
    _ok(out, N)
    measured = 10 * torch.log10(audio.square().mean() / (out - audio).square().mean())
    assert measured.item() == pytest.approx(snr, abs=0.05)


def test_noise_colours_have_their_slopes() -> None:
    rng = np.random.default_rng(1)
    low = [_band_energy(colored_noise(N, e, rng), 0, 1000) for e in (0.0, 1.0, 2.0)]
    assert low[0] < low[1] < low[2] and low[0] == pytest.approx(1000 / 8000, abs=0.02)
    # The exponent itself: the log-log slope of the power spectrum, averaged over draws, 100 Hz - 6 kHz.
    freqs = torch.fft.rfftfreq(N, 1 / 16000)
    band = (freqs >= 100) & (freqs <= 6000)
    for exponent in (0.0, 1.0, 2.0):
        power = sum(torch.fft.rfft(colored_noise(N, exponent, rng)).abs().square() for _ in range(8))
        slope = np.polyfit(freqs[band].log().numpy(), power[band].log().numpy(), 1)[0]
        assert slope == pytest.approx(-exponent, abs=0.1)


def test_fast_fft_len_is_the_next_5_smooth_number() -> None:
    def smooth(m: int) -> bool:
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in [*range(1, 3000), 86011, 99991, 1_000_003]:
        m = fast_fft_len(n)
        assert m >= n and smooth(m) and not any(smooth(k) for k in range(n, m)), n


def test_reverb_and_noise_at_a_prime_length() -> None:
    """Utterance lengths are arbitrary (the FFTs run at a padded fast length): reverb equals the direct
    convolution, and noise keeps its length and colour."""
    n, rng = 32003, np.random.default_rng(3)  # a prime
    audio = torch.from_numpy(bursty_audio(n / 16000, seed=4))[:n]
    rir = room_impulse_response(0.3, rng)
    direct = torch.from_numpy(np.convolve(audio.double().numpy(), rir.double().numpy())[:n])
    direct = direct * (audio.abs().max() / direct.abs().max())
    out = reverberate(audio, rir)
    assert out.shape == (n,) and ((out.double() - direct).norm() / direct.norm()).item() < 1e-5
    low = [_band_energy(colored_noise(n, e, rng), 0, 1000) for e in (0.0, 2.0)]
    assert low[0] == pytest.approx(1000 / 8000, abs=0.02) and low[1] > 0.5


def test_babble_is_a_sum_of_other_speech() -> None:
    others = [torch.from_numpy(bursty_audio(0.7, seed=s)) for s in range(4)]
    out = babble(others, N)
    _ok(out, N)
    assert out.square().mean().item() > 1.0  # four unit-power voices


def test_reverb_keeps_length_and_peak(audio: torch.Tensor) -> None:
    rng = np.random.default_rng(2)
    rir = room_impulse_response(0.5, rng)
    assert rir[0] == rir.abs().max() and rir[4000:].abs().max() < 0.05 * rir[0]  # decays after 0.25 s
    out = reverberate(audio, rir)
    _ok(out, N)
    assert out.abs().max().item() == pytest.approx(audio.abs().max().item(), rel=1e-5)
    assert not torch.allclose(out, audio)


def test_telephone_removes_the_high_band() -> None:
    white = colored_noise(N, 0.0, np.random.default_rng(3)) * 0.1
    out = telephone(white)
    _ok(out, N)
    assert _band_energy(white, 4000, 8000) > 0.45 and _band_energy(out, 4000, 8000) < 0.01


def test_codec_round_trip_keeps_length(audio: torch.Tensor) -> None:
    for seed in range(6):  # covers each codec
        out = codec_round_trip(audio, np.random.default_rng(seed))
        _ok(out, N)
        assert out.abs().max() > 0.1 and not torch.equal(out, audio)


def test_augmenter_switches_and_determinism(audio: torch.Tensor) -> None:
    off = Augmenter(AugmentConfig(speed=0, noise=0, reverb=0, telephone=0, codec=0))
    assert torch.equal(off(audio, np.random.default_rng(0)), audio)
    everything = AugmentConfig(speed=1, noise=1, reverb=1, telephone=1, codec=1, babble_share=0.5)
    aug = Augmenter(everything, lambda rng: [torch.from_numpy(bursty_audio(1.0, seed=int(rng.integers(9))))])
    a, b = aug(audio, np.random.default_rng(5)), aug(audio, np.random.default_rng(5))
    assert torch.equal(a, b) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert min(abs(a.numel() - N / f) for f in everything.speed_factors) <= 2
