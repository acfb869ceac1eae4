import random

import numpy as np
import pytest
import torch
import torchaudio

from asr.audio import AudioError, StreamingResampler, audio_info, load_audio, stream_audio
from tests.conftest import bursty_audio


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_streaming_resampler_matches_torchaudio(rate: int) -> None:
    """Any chunking gives torchaudio's length and adds no error beyond torchaudio's own float32 pass.

    Both are measured against torchaudio in float64: a fixed bound on the float32 difference is
    noise-limited (about 1e-5 at 11025 Hz, depending on the input).
    """
    rng = random.Random(rate)
    x = torch.randn(rate + rng.randrange(1000), generator=torch.Generator().manual_seed(rate))
    expected = torchaudio.functional.resample(x, rate, 16000)
    exact = torchaudio.functional.resample(x.double(), rate, 16000)
    r, out, i = StreamingResampler(rate), [], 0
    while i < x.numel():
        n = rng.choice([1, 3, 160, 441, 4096])
        out.append(r.accept(x[i : i + n]))
        i += n
    out.append(r.flush())
    got = torch.cat(out)
    assert got.shape == expected.shape

    def error(y: torch.Tensor) -> float:
        return ((y.double() - exact).norm() / exact.norm()).item()

    assert error(got) <= max(error(expected), 1e-7)


def test_resampler_passthrough_and_bad_rate() -> None:
    r = StreamingResampler(16000)
    x = torch.randn(100)
    assert torch.equal(r.accept(x), x) and r.flush().numel() == 0
    with pytest.raises(ValueError):
        StreamingResampler(0)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("a.wav", {"subtype": "PCM_16"}),
        ("a.flac", {}),
        ("a.ogg", {"format": "OGG", "subtype": "VORBIS"}),
        ("a.opus", {"format": "OGG", "subtype": "OPUS"}),
        ("a.mp3", {"format": "MP3"}),
    ],
)
def test_reads_common_formats_mixed_and_resampled(write_audio, name: str, kwargs: dict) -> None:
    sr = 48000 if "OPUS" in kwargs.values() else 44100
    mono = bursty_audio(1.5, sr)
    stereo = np.stack([mono, 0.5 * mono], axis=1)
    path = write_audio(name, stereo, sr, **kwargs)
    info = audio_info(path)
    assert (info.sample_rate, info.channels) == (sr, 2)
    got = load_audio(path)
    expected = torchaudio.functional.resample(torch.from_numpy(0.75 * mono), sr, 16000)
    assert abs(got.numel() - expected.numel()) <= 16000 * 0.1  # lossy codecs add encoder delay
    if name.endswith((".wav", ".flac")):  # lossless: the exact signal
        assert got.shape == expected.shape
        assert ((got - expected).norm() / expected.norm()).item() < 1e-3


def test_stream_blocks_equal_whole_file(write_audio) -> None:
    path = write_audio("b.wav", bursty_audio(3.0, 22050), 22050, subtype="FLOAT")
    whole = load_audio(path)
    pieces = list(stream_audio(path, block_s=0.013))
    assert len(pieces) > 100
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-4, atol=1e-5)


def test_bad_files_raise_audio_error_naming_the_file(tmp_path, write_audio) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00not really a wav file" * 10)
    empty = tmp_path / "empty.flac"
    empty.touch()
    text = tmp_path / "notes.mp3"
    text.write_text("these are not the samples you are looking for\n" * 50)
    no_frames = write_audio("silent.wav", np.zeros((0,), np.float32))
    for path, reason in [
        (garbage, "not a readable audio file"),
        (empty, "empty file"),
        (text, "not a readable audio file"),
        (tmp_path / "missing.wav", "no such file"),
        (no_frames, "contains no audio"),
    ]:
        with pytest.raises(AudioError, match=reason) as e:
            load_audio(path)
        assert str(path) in str(e.value)


def test_truncated_files(write_audio) -> None:
    flac = write_audio("t.flac", bursty_audio(2.0))
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    with pytest.raises(AudioError, match="t.flac: decoding failed"):
        load_audio(flac)
    wav = write_audio("t.wav", bursty_audio(2.0), subtype="PCM_16")
    wav.write_bytes(wav.read_bytes()[: wav.stat().st_size // 2])
    assert 15_000 < load_audio(wav).numel() < 17_000  # a cut WAV yields what it holds
