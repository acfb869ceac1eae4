import random

import pytest
import torch

from asr.decoding import GreedyCTCDecoder, SegmenterConfig, Transcript, Word, decode
from asr.text import VOCAB

IDS = {ch: i for i, ch in enumerate(VOCAB)}
FRAME = 0.04


def frames(spec: str, prob: float = 0.9) -> torch.Tensor:
    """One frame per character of `spec`: '_' is blank, '|' is space, other characters themselves."""
    lp = torch.full((len(spec), len(VOCAB)), -20.0)
    for t, ch in enumerate(spec):
        lp[t, IDS["<blank>" if ch == "_" else " " if ch == "|" else ch]] = torch.log(torch.tensor(prob))
    return lp


def test_collapses_repeats_and_keeps_blank_separated_doubles() -> None:
    out = decode(frames("HHEE_LL_LLOO__|_WW_O_RLD"))
    assert out.text == "HELLO WORLD"


def test_word_times_and_confidence() -> None:
    lp = frames("__CC_A_T___|__D_O_G__")
    lp[2, IDS["C"]] = torch.log(torch.tensor(0.5))  # peak of C over its frames stays 0.9
    out = decode(lp)
    assert out.words == (
        Word("CAT", start=2 * FRAME, end=8 * FRAME, conf=0.9),
        Word("DOG", start=14 * FRAME, end=19 * FRAME, conf=0.9),
    )
    assert out.duration == pytest.approx(len("__CC_A_T___|__D_O_G__") * FRAME)


def test_confidence_is_mean_character_posterior() -> None:
    lp = frames("AB")
    lp[1, IDS["B"]] = torch.log(torch.tensor(0.5))
    assert decode(lp).words[0].conf == pytest.approx(0.7, abs=1e-4)


def test_pause_splits_segments() -> None:
    cfg = SegmenterConfig(pause_s=0.4)
    pause = "_" * 12  # 0.48 s
    out = decode(frames("HI|YOU" + pause + "OK_" + "|" * 5 + "GO"), config=cfg)
    assert [s.text for s in out.segments] == ["HI YOU", "OK GO"]
    assert [s.id for s in out.segments] == [0, 1]
    assert out.segments[0].start == 0 and out.segments[0].end == pytest.approx(6 * FRAME)
    assert out.segments[1].start == pytest.approx(18 * FRAME)


def test_max_segment_length_cuts_at_word_boundaries() -> None:
    cfg = SegmenterConfig(pause_s=10, max_segment_s=1.0)
    spec = "|".join(["AB_C_D"] * 12)  # 12 words, 7 frames each
    out = decode(frames(spec), config=cfg)
    assert len(out.segments) > 1
    assert all(s.end - s.start <= 1.0 + 7 * FRAME for s in out.segments)
    assert out.text == " ".join(["ABCD"] * 12)


def test_a_single_endless_word_is_still_cut() -> None:
    out = decode(frames("AB" * 100), config=SegmenterConfig(max_segment_s=1.0))
    assert len(out.segments) >= 7 and "".join(s.text for s in out.segments) == "AB" * 100


@pytest.mark.parametrize("seed", range(5))
def test_streaming_feed_equals_offline(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lp = torch.randn(400, len(VOCAB)) * 3
    lp[:, 0] += 4  # mostly blanks, like a real model
    lp = lp.log_softmax(-1)
    cfg = SegmenterConfig(pause_s=0.2, max_segment_s=2.0)
    offline = decode(lp, config=cfg)
    dec, segments, i = GreedyCTCDecoder(config=cfg), [], 0
    while i < 400:
        n = rng.randint(1, 30)
        segments += dec.feed(lp[i : i + n])
        i += n
    segments += dec.flush()
    assert Transcript(tuple(segments), offline.duration) == offline and len(segments) > 2


def test_partial_shows_words_in_progress() -> None:
    dec = GreedyCTCDecoder()
    assert dec.partial() is None
    assert dec.feed(frames("HI|TH")) == []
    assert dec.partial().text == "HI TH"
    assert [s.text for s in dec.flush()] == ["HI TH"] and dec.partial() is None


def test_bad_segmenter_config() -> None:
    with pytest.raises(ValueError):
        SegmenterConfig(pause_s=0)
