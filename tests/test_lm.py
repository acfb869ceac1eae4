"""The word LM: KenLM build, lexicon beam search, segment rescoring in streaming and offline decoding."""

from __future__ import annotations

import json
import random
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch

from asr.cli import main
from asr.decoding import LOOKBACK_FRAMES, GreedyCTCDecoder, Segment, decode
from asr.lm import (
    DECODER_FILE,
    LEXICON_FILE,
    BeamConfig,
    BeamSearch,
    LMError,
    RescoreJob,
    RescorePool,
    SegmentRescorer,
    build_lm,
    lm_sentences,
    word_list,
)
from asr.text import BLANK_ID, SPACE_ID, VOCAB


def _emissions(spec: list[dict[str, float]], blanks_between: int = 1) -> torch.Tensor:
    """(L, V) log-probs: each spec frame's tokens get their probabilities (the rest of the mass to blank),
    with blank frames between them. ' ' is the space token."""
    rows = []
    for probs in spec:
        for _ in range(blanks_between):
            rows.append({VOCAB[BLANK_ID]: 1.0})
        rows.append(probs)
    out = torch.full((len(rows), len(VOCAB)), 1e-6)
    for i, probs in enumerate(rows):
        for token, p in probs.items():
            out[i, VOCAB.index(token)] = p
        out[i, BLANK_ID] += max(0.0, 1.0 - sum(probs.values()))
    return (out / out.sum(-1, keepdim=True)).log()


def _spell(text: str, tricks: dict[int, dict[str, float]] | None = None) -> list[dict[str, float]]:
    """One frame per character of `text`; `tricks[i]` replaces character i's distribution."""
    return [(tricks or {}).get(i, {c: 0.95}) for i, c in enumerate(text)]


def _search(lm_dir: Path) -> BeamSearch:
    return BeamSearch(lm_dir, BeamConfig(beam_size=16, lm_weight=1.0))


def test_build_writes_lm_lexicon_and_decoder_settings(tmp_path: Path, sentences_file: Path) -> None:
    out = tmp_path / "lm"
    summary = build_lm(lm_sentences([sentences_file]), out, order=3, prune=(0,), config=BeamConfig(lm_weight=1.5))
    assert summary.sentences == 400 and summary.order == 3 and summary.size_bytes > 0
    lexicon = (out / LEXICON_FILE).read_text().splitlines()
    assert "HOUSE H O U S E |" in lexicon and len(lexicon) == summary.lexicon
    assert BeamConfig.from_json(out / DECODER_FILE) == BeamConfig(lm_weight=1.5)
    kept = list(lm_sentences([sentences_file], keep=lambda t: "RIVER" in t))
    assert kept and all("RIVER" in t for t in kept) and len(kept) < 400


def test_word_lists_add_words_the_beam_search_can_write(
    tmp_path: Path, sentences_file: Path, tiny_lm_dir: Path
) -> None:
    words_file = tmp_path / "words"
    words_file.write_text("zyzzyva\nriver\nad hoc\n\ncafé\n")
    words = word_list([words_file])
    assert words == ["CAFE", "RIVER", "ZYZZYVA"]  # normalized; a two-word entry is left out
    out = tmp_path / "lm"
    summary = build_lm(lm_sentences([sentences_file]), out, order=3, prune=(0,), extra_words=words)
    assert summary.added_words == 2 and summary.sentences == 400  # RIVER was in the text already
    assert "ZYZZYVA Z Y Z Z Y V A |" in (out / LEXICON_FILE).read_text().splitlines()
    lp = _emissions(_spell("THE ZYZZYVA"))
    assert [w for w, *_ in _search(out).words(lp)] == ["THE", "ZYZZYVA"]
    assert "ZYZZYVA" not in [w for w, *_ in _search(tiny_lm_dir).words(lp)]  # without the list it cannot
    with pytest.raises(LMError, match="cannot read"):
        word_list([tmp_path / "missing"])


def test_beam_search_writes_lexicon_words_with_frames(tiny_lm_dir: Path) -> None:
    # greedy reads "THE RIVEX": X beats R at the last character, but RIVEX is no word
    lp = _emissions(_spell("THE RIVER", {8: {"X": 0.5, "R": 0.45}}))
    assert decode(lp).text == "THE RIVEX"
    words = _search(tiny_lm_dir).words(lp)
    assert [w for w, *_ in words] == ["THE", "RIVER"]
    (_, s0, e0, c0), (_, s1, e1, c1) = words
    assert (s0, e0) == (1, 5) and (s1, e1) == (9, 17)  # frames where the first and last characters fire
    assert 0.9 < c0 <= 1.0 and 0.4 < c1 < 0.95


def test_rescored_segments_are_the_same_in_any_chunking(tiny_lm_dir: Path) -> None:
    first = _spell("THE RED HOUSE", {12: {"F": 0.6, "E": 0.35}})
    second = _spell("THE BLUE STONE", {2: {"A": 0.6, "E": 0.35}})
    pause = [{VOCAB[BLANK_ID]: 1.0}] * 40
    lp = _emissions(first + pause + second)
    search = _search(tiny_lm_dir)
    offline = decode(lp, rescorer=SegmentRescorer(search))
    assert [s.text for s in offline.segments] == ["THE RED HOUSE", "THE BLUE STONE"]
    assert decode(lp).text == "THE RED HOUSF THA BLUE STONE"
    assert offline.segments[1].words[0].start == pytest.approx(((2 * 13) + 80 + 1) * 0.04)
    rng = random.Random(0)
    for _ in range(5):
        decoder = GreedyCTCDecoder(rescorer=SegmentRescorer(search))
        segments, i = [], 0
        while i < lp.shape[0]:
            n = rng.randint(1, 20)
            segments += decoder.feed(lp[i : i + n])
            i += n
        assert tuple(segments + decoder.flush()) == offline.segments


def test_rescorer_keeps_little_during_silence(tiny_lm_dir: Path) -> None:
    rescorer = SegmentRescorer(_search(tiny_lm_dir))
    decoder = GreedyCTCDecoder(rescorer=rescorer)
    silence = _emissions([{VOCAB[BLANK_ID]: 1.0}] * 2000, blanks_between=0)
    for i in range(0, 2000, 7):
        decoder.feed(silence[i : i + 7])
    assert rescorer.buffered_frames <= LOOKBACK_FRAMES
    speech = _emissions(_spell("THE BIRD"))
    assert [s.text for s in decoder.feed(speech) + decoder.flush()] == ["THE BIRD"]
    with pytest.raises(ValueError, match="log-probabilities"):
        decoder.feed_best([0.9], [SPACE_ID])


def test_errors_are_clear(tmp_path: Path, sentences_file: Path, tiny_lm_dir: Path) -> None:
    with pytest.raises(LMError, match="lm.bin not found"):
        BeamSearch(tmp_path)
    with pytest.raises(LMError, match="build_kenlm.sh"):
        build_lm(["A B"], tmp_path / "x", kenlm_bin=tmp_path)
    with pytest.raises(LMError, match="no text"):
        build_lm([], tmp_path / "x")
    bad = tmp_path / "decoder.json"
    bad.write_text(json.dumps({"beam": 3}))
    with pytest.raises(LMError, match="unknown keys"):
        BeamConfig.from_json(bad)
    with pytest.raises(ValueError, match="beam_size"):
        BeamConfig(beam_size=0)


def test_cli_builds_and_uses_an_lm(
    tmp_path: Path, sentences_file: Path, tiny_model_dir: Path, speech_wav: Path, capsys
) -> None:
    out = tmp_path / "lm"
    (tmp_path / "words").write_text("zyzzyva\n")
    build = ["lm", "--text", str(sentences_file), "--words", str(tmp_path / "words"), "--out", str(out)]
    assert main([*build, "--order", "3", "--prune", "0"]) == 0
    printed = capsys.readouterr().out
    assert "3-gram LM from 400 sentences" in printed and "(1 from word lists)" in printed
    lexicon = {line.split()[0] for line in (out / LEXICON_FILE).read_text().splitlines()}
    args = ["transcribe", str(speech_wav), "--model", str(tiny_model_dir), "-f", "json", "-o", str(tmp_path), "-q"]
    assert main([*args, "--lm", str(out), "--lm-weight", "3"]) == 0
    words = [w["word"] for s in json.loads((tmp_path / "speech.json").read_text())["segments"] for w in s["words"]]
    assert words and set(words) <= lexicon  # a random model, but every word is a lexicon word
    assert main([*args, "--lm", str(out), "--no-lm"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main([*args, "--no-lm", "--lm-weight", "3"]) == 2
    assert "--lm-weight set the LM beam search, which --no-lm turns off" in capsys.readouterr().err
    assert main([*args, "--lm", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    (out / DECODER_FILE).unlink()  # no decoder.json: the default settings
    assert BeamConfig.of(out) == BeamConfig()
    assert main([*args, "--lm", str(out)]) == 0


def test_a_pool_that_lost_a_process_is_replaced(tiny_lm_dir: Path) -> None:
    """After a decoding process dies, the pool is broken for good (ProcessPoolExecutor); the next submit starts a
    fresh pool instead of raising in the server's batcher thread, and decodes as before."""
    search = _search(tiny_lm_dir)
    lp = _emissions(_spell("THE RIVER"))
    job = RescoreJob(Segment(0, 0.0, 1.0, "THE RIVER", ()), 0, lp)
    pool = RescorePool(search, 1)
    try:
        assert pool.submit(job).result(60) == search.words(lp)
        victim = next(iter(pool._pool._processes.values()))
        victim.kill()
        victim.join()
        with pytest.raises(BrokenProcessPool):  # the executor notices the death
            pool._pool.submit(int).result(60)
        assert pool.submit(job).result(60) == search.words(lp)
    finally:
        pool.shutdown()
