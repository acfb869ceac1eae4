import json
import re
from pathlib import Path

import pytest

from asr.checkpoint import load_model
from asr.cli import main
from asr.data import Utterance, read_source
from asr.evaluate import ErrorCounts, evaluate, score, summarize, write_errors


@pytest.mark.parametrize(
    "ref, hyp, words, chars",
    [
        ("THE CAT SAT", "THE CAT SAT", ErrorCounts(3, 0, 0, 0), ErrorCounts(11, 0, 0, 0)),
        ("THE CAT SAT", "THE BAT SAT DOWN", ErrorCounts(2, 1, 0, 1), ErrorCounts(10, 1, 0, 5)),
        ("A B C D", "A C", ErrorCounts(2, 0, 2, 0), ErrorCounts(3, 0, 4, 0)),
        ("HELLO", "", ErrorCounts(0, 0, 1, 0), ErrorCounts(0, 0, 5, 0)),
        ("", "UH UM", ErrorCounts(0, 0, 0, 2), ErrorCounts(0, 0, 0, 5)),
    ],
)
def test_word_and_character_counts(ref: str, hyp: str, words: ErrorCounts, chars: ErrorCounts) -> None:
    w, c, _ = score(ref, hyp)
    assert (w, c) == (words, chars)


def test_corpus_rates_pool_the_counts() -> None:
    from asr.evaluate import UtteranceResult

    pairs = [("THE CAT SAT", "THE BAT SAT DOWN"), ("A B C D", "A C"), ("", "UH")]
    results = [UtteranceResult(str(i), r, h, 2.0, *score(r, h)) for i, (r, h) in enumerate(pairs)]
    s = summarize(results, failed=1, compute_s=0.5, mode="offline")
    assert (s.substitutions, s.deletions, s.insertions, s.ref_words) == (1, 2, 2, 7)
    assert s.wer == pytest.approx(5 / 7) and s.cer == pytest.approx((1 + 5 + 4 + 2) / (11 + 7))
    assert s.rtfx == pytest.approx(12.0) and s.failed == 1
    assert s.report("x").splitlines()[-1] == "WER 71.43% on 3 utterances (0.00 h)"


def test_errors_file_is_worst_first(tmp_path: Path) -> None:
    from asr.evaluate import UtteranceResult

    pairs = [("A B", "A B"), ("A B C D", "X Y Z"), ("A B", "A C")]
    results = [UtteranceResult(f"u{i}", r, h, 1.0, *score(r, h)) for i, (r, h) in enumerate(pairs)]
    write_errors(results, tmp_path / "e.txt")
    text = (tmp_path / "e.txt").read_text()
    assert [line.split()[0] for line in text.splitlines() if line.startswith("u")] == ["u1", "u2", "u0"]
    assert "REF:" in text and "HYP:" in text


def test_offline_and_streaming_give_identical_hypotheses(tiny_corpus: Path, tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir)
    utts = read_source(tiny_corpus).utterances
    offline, off_results = evaluate(model, utts, "offline")
    for chunk_ms in (40, 330):
        streaming, st_results = evaluate(model, utts, "streaming", chunk_ms=chunk_ms)
        assert [r.hyp for r in st_results] == [r.hyp for r in off_results]
        assert streaming.wer == offline.wer
    assert any(r.hyp for r in off_results)


def test_unreadable_utterances_are_counted_and_skipped(tiny_corpus: Path, tiny_model_dir: Path, tmp_path) -> None:
    model, _ = load_model(tiny_model_dir)
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"garbage")
    utts = [*read_source(tiny_corpus).utterances[:2], Utterance("bad", bad, "A", 1.0)]
    errors: list[str] = []
    summary, results = evaluate(model, utts, "offline", on_error=errors.append)
    assert summary.utterances == 2 and summary.failed == 1 and len(results) == 2
    assert len(errors) == 1 and errors[0].startswith("bad:")


def test_eval_cli(capsys, tiny_corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["eval", "--data", str(tiny_corpus / "train.jsonl"), "--model", str(tiny_model_dir), "-q"]
    code = main([*args, "--limit", "3", "--json", str(tmp_path / "s.json"), "--errors", str(tmp_path / "e.txt")])
    out = capsys.readouterr().out
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"WER \d+\.\d\d% on 3 utterances \(\d+\.\d\d h\)", last)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["utterances"] == 3 and f"{100 * summary['wer']:.2f}%" in last
    assert {"wer", "cer", "substitutions", "deletions", "insertions", "hours", "rtfx"} <= set(summary)
    assert (tmp_path / "e.txt").read_text().count("REF:") == 3
    assert summary["dtype"] == "float32" and "greedy decoding, float32)" in out
    assert main([*args, "--limit", "1", "--json", str(tmp_path / "b.json"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["dtype"] == "bfloat16"
    assert "greedy decoding, bfloat16)" in capsys.readouterr().out
    assert main(["eval", "--data", str(tmp_path / "missing"), "--model", str(tiny_model_dir)]) == 2
    assert "not found" in capsys.readouterr().err
