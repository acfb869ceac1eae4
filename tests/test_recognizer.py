"""Invariant 1 end to end: audio in any chunking -> same frames, logits and text as one pass."""

import random

import pytest
import torch

from asr.decoding import GreedyCTCDecoder, decode
from asr.features import CMVN, N_MELS
from asr.model import ASRModel
from asr.recognizer import StreamRecognizer, offline_log_probs
from tests.conftest import TINY, bursty_audio


@pytest.fixture(scope="module")
def model() -> ASRModel:
    torch.manual_seed(5)
    return ASRModel(TINY, CMVN(torch.full((N_MELS,), -4.0), torch.full((N_MELS,), 0.4))).eval()


@pytest.mark.parametrize("sizes", [[1], [37, 1601, 5], [640], [160_000]])
def test_audio_chunks_give_offline_logits_and_text(model: ASRModel, sizes: list[int]) -> None:
    audio = torch.from_numpy(bursty_audio(0.6 if sizes == [1] else 4.3, seed=len(sizes)))
    offline = offline_log_probs(model, audio)
    rec, out, i, k = StreamRecognizer(model), [], 0, 0
    while i < audio.numel():
        n = sizes[k % len(sizes)]
        out.append(rec.accept(audio[i : i + n]))
        i, k = i + n, k + 1
    out.append(rec.finish())
    streamed = torch.cat(out)
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, rtol=1e-5, atol=1e-5)
    assert decode(streamed) == decode(offline) and decode(offline).text


def test_random_chunking_with_streaming_decoder(model: ASRModel) -> None:
    rng = random.Random(0)
    audio = torch.from_numpy(bursty_audio(6.0, seed=9))
    expected = decode(offline_log_probs(model, audio))
    rec, dec, segments, i = StreamRecognizer(model), GreedyCTCDecoder(), [], 0
    while i < audio.numel():
        n = rng.randint(1, 8000)
        segments += dec.feed(rec.accept(audio[i : i + n]))
        i += n
    segments += dec.feed(rec.finish()) + dec.flush()
    assert tuple(segments) == expected.segments
