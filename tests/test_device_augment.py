"""Reverb and noise per batch on the training device (training.device_augment), checked on the CPU."""

import numpy as np
import pytest
import torch

from tests.conftest import bursty_audio
from training import device_augment as D


def _batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) zero-padded speech-like audio and its lengths."""
    audio = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        audio[i, :n] = torch.from_numpy(bursty_audio(n / 16000, seed=i))
    return audio, torch.tensor(lengths)


LENGTHS = [32_000, 30_011, 24_000, 28_000, 31_000]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_nothing_chosen_leaves_the_batch_alone() -> None:
    audio, lengths = _batch(LENGTHS)
    assert torch.equal(D.augment_batch(audio, lengths, 0.0, 0.0, 0.3, _g()), audio)


def test_noise_hits_each_rows_snr_and_leaves_padding_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    audio, lengths = _batch(LENGTHS)
    for share in (0.0, 1.0):  # colored noise only, babble only
        monkeypatch.setattr(D, "SNR_DB", (12.0, 12.0))
        out = D.augment_batch(audio, lengths, 0.0, 1.0, share, _g(1))
        for i, n in enumerate(LENGTHS):
            added = out[i, :n] - audio[i, :n]
            assert 10 * torch.log10(audio[i, :n].square().mean() / added.square().mean()) == pytest.approx(
                12.0, abs=0.05
            )
            assert not out[i, n:].any()


def _in_span(rows: torch.Tensor, x: torch.Tensor) -> bool:
    coef = torch.linalg.lstsq(rows.T, x).solution
    return torch.allclose(rows.T @ coef, x, atol=1e-3)


def test_babble_is_other_rows_of_the_batch_repeated_to_length() -> None:
    audio, lengths = _batch(LENGTHS)
    valid = torch.arange(audio.shape[1]) < lengths[:, None]
    mix = D.babble(audio, lengths, valid, _g(2))
    n = audio.shape[1]
    tiled = torch.stack([audio[j].repeat(2)[torch.arange(n) % LENGTHS[j]] for j in range(len(LENGTHS))])
    for i in range(len(LENGTHS)):  # row i's babble lies in the span of the other rows, repeated, not its own
        assert _in_span(torch.cat([tiled[:i], tiled[i + 1 :]]), mix[i])


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_noise_is_babble_in_its_share(share: float) -> None:
    audio, lengths = _batch([24_000] * 5)
    noise = D.augment_batch(audio, lengths, 0.0, 1.0, share, _g(5)) - audio
    for i in range(5):
        assert _in_span(torch.cat([audio[:i], audio[i + 1 :]]), noise[i]) == (share == 1.0)


def test_noise_colours_have_their_slopes() -> None:
    noise = torch.cat([D.colored_noise(64, 32_000, torch.zeros(1), _g(s)) for s in range(3)])
    exponents = torch.cat([torch.randint(0, 3, (64, 1), generator=_g(s)).float() for s in range(3)])
    freqs = torch.fft.rfftfreq(32_000, 1 / 16000)
    band = (freqs >= 100) & (freqs <= 6000)
    for e in (0.0, 1.0, 2.0):
        power = torch.fft.rfft(noise[exponents[:, 0] == e]).abs().square().sum(0)
        slope = np.polyfit(freqs[band].log().numpy(), power[band].log().numpy(), 1)[0]
        assert slope == pytest.approx(-e, abs=0.1)


def test_reverb_keeps_lengths_and_peaks_and_reproduces() -> None:
    audio, lengths = _batch(LENGTHS)
    out = D.augment_batch(audio, lengths, 1.0, 0.0, 0.3, _g(3))
    assert torch.equal(out, D.augment_batch(audio, lengths, 1.0, 0.0, 0.3, _g(3)))
    for i, n in enumerate(LENGTHS):
        assert not out[i, n:].any() and not torch.allclose(out[i, :n], audio[i, :n], atol=1e-3)
        assert out[i].abs().max() == pytest.approx(audio[i].abs().max().item(), rel=1e-5)
    rir = D.room_impulse_responses(8, audio, _g(4))
    assert torch.allclose(rir.square().sum(-1), torch.ones(8)) and (rir[:, 0] > rir[:, 1:].abs().amax(-1)).all()
    assert not rir[:, 1:32].any()  # the reflections arrive 2-10 ms after the direct path
    ends = [int(row.nonzero().max()) / 16000 for row in rir]  # and stop at each row's rt60
    assert all(D.RT60_S[0] - 0.01 < e <= D.RT60_S[1] for e in ends) and len(set(ends)) == 8
