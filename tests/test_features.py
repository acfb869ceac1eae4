import random

import pytest
import torch

from asr import features as F
from asr.features import CMVN, CMVNAccumulator, Framer, LogMel, StreamingLogMel, num_frames


@pytest.fixture(scope="module")
def logmel() -> LogMel:
    return LogMel()


def _stream(logmel: LogMel, audio: torch.Tensor, sizes) -> torch.Tensor:
    s = StreamingLogMel(logmel)
    out, i = [], 0
    for n in sizes:
        out.append(s.accept(audio[i : i + n]))
        i += n
    assert i >= audio.numel()
    return torch.cat(out)


def test_constants_are_derived() -> None:
    assert (F.WINDOW_SAMPLES, F.HOP_SAMPLES, F.FEATURE_RATE) == (400, 160, 100.0)
    assert F.ENCODER_FRAME_S == pytest.approx(0.04)
    assert F.ENCODER_FRAME_SAMPLES == F.HOP_SAMPLES * F.SUBSAMPLING


@pytest.mark.parametrize("n", [0, 399, 400, 559, 560, 16000])
def test_frame_count(logmel: LogMel, n: int) -> None:
    assert logmel(torch.randn(n)).shape == (num_frames(n), F.N_MELS)
    assert num_frames(n) == (0 if n < 400 else 1 + (n - 400) // 160)


def test_one_sample_chunks_are_exact(logmel: LogMel) -> None:
    audio = torch.randn(2_500) * 0.1
    assert torch.equal(_stream(logmel, audio, [1] * audio.numel()), logmel(audio))


@pytest.mark.parametrize("seed", range(3))
def test_unaligned_random_chunks_are_exact(logmel: LogMel, seed: int) -> None:
    rng = random.Random(seed)
    audio = torch.randn(16_000 * 2 + rng.randrange(500)) * 0.1
    sizes = [rng.choice([1, 7, 159, 161, 399, 401, 1234]) for _ in range(2000)]
    assert torch.equal(_stream(logmel, audio, sizes), logmel(audio))


def test_chunks_far_larger_than_a_frame_are_exact(logmel: LogMel) -> None:
    audio = torch.randn(16_000 * 5 + 77) * 0.1
    assert torch.equal(_stream(logmel, audio, [48_000, 48_000]), logmel(audio))


@pytest.mark.parametrize("seed", range(2))
def test_windows_of_many_streams_extract_exactly_in_one_batch(logmel: LogMel, seed: int) -> None:
    """What a server does: frame each stream on its own, extract every stream's new windows in one call."""
    rng = random.Random(seed)
    audios = [torch.randn(rng.randrange(300, 9000)) * 0.1 for _ in range(4)]
    framers, done, out = [Framer() for _ in audios], [0] * 4, [[] for _ in audios]
    while any(d < a.numel() for d, a in zip(done, audios, strict=True)):
        windows = []
        for i, (framer, audio) in enumerate(zip(framers, audios, strict=True)):
            n = rng.choice([0, 1, 160, 399, 1000])
            windows.append(framer.accept(audio[done[i] : done[i] + n]))
            done[i] += n
        feats = logmel.frames(torch.cat(windows)).split([w.shape[0] for w in windows])
        for i, f in enumerate(feats):
            out[i].append(f)
    for audio, parts in zip(audios, out, strict=True):
        assert torch.equal(torch.cat(parts), logmel(audio))


def test_frames_are_causal(logmel: LogMel) -> None:
    audio = torch.randn(8000)
    changed = audio.clone()
    changed[5000:] = torch.randn(3000)
    keep = num_frames(5000)  # frames whose windows end at or before sample 5000
    assert torch.equal(logmel(audio)[:keep], logmel(changed)[:keep])
    assert not torch.equal(logmel(audio)[keep:], logmel(changed)[keep:])


def test_silence_is_finite(logmel: LogMel) -> None:
    out = logmel(torch.zeros(4000))
    assert torch.isfinite(out).all() and out.max() == pytest.approx(torch.log(torch.tensor(F.LOG_FLOOR)))


def test_cmvn_accumulator_matches_torch_statistics() -> None:
    feats = [torch.randn(50, F.N_MELS) * 3 + 2, torch.randn(1, 17, F.N_MELS) * 3 + 2]
    acc = CMVNAccumulator()
    for f in feats:
        acc.update(f)
    cmvn = acc.finalize()
    flat = torch.cat([f.reshape(-1, F.N_MELS) for f in feats]).double()
    torch.testing.assert_close(cmvn.mean.double(), flat.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cmvn.istd.double(), 1 / flat.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    normed = (flat.float() - cmvn.mean) * cmvn.istd
    torch.testing.assert_close(normed.mean(0), torch.zeros(F.N_MELS), atol=1e-4, rtol=0)


def test_cmvn_errors_and_round_trip() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CMVNAccumulator().finalize()
    cmvn = CMVN(torch.randn(F.N_MELS), torch.rand(F.N_MELS) + 0.5)
    back = CMVN.from_dict(cmvn.to_dict())
    assert torch.equal(back.mean, cmvn.mean) and torch.equal(back.istd, cmvn.istd)
    with pytest.raises(ValueError, match="80 bins"):
        CMVN.from_dict({"mean": [0.0] * 3, "istd": [1.0] * 3})


@pytest.mark.parametrize("n", [0, 399, 400, 16_000])
def test_training_features_equal_the_fft_features(logmel: LogMel, n: int) -> None:
    """BatchLogMel (training's DFT product) gives LogMel's features within float32 rounding: speech-like noise,
    a pure tone (bins near the floor) and digital silence, batched and padded."""
    g = torch.Generator().manual_seed(n)
    audio = torch.stack([0.1 * torch.randn(n, generator=g), 0.5 * torch.sin(0.3 * torch.arange(n)), torch.zeros(n)])
    expected, got = logmel(audio), F.BatchLogMel()(audio)
    assert got.shape == expected.shape == (3, num_frames(n), F.N_MELS)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
