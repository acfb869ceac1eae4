import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from asr import synth
from asr.synth import SynthError, Voice, build_corpus, list_voices, load_sentences, plan_jobs


@pytest.fixture(scope="module")
def espeak_voices() -> list[Voice]:
    return list_voices(("espeak",))


def test_espeak_inventory_is_accents_times_variants(espeak_voices: list[Voice]) -> None:
    accents = {v.name.split("+")[0] for v in espeak_voices}
    variants = {v.name.split("+")[1] for v in espeak_voices}
    assert {"en-us", "en-gb", "en-gb-scotland"} <= accents
    assert len(variants) > 50 and len(espeak_voices) == len(accents) * len(variants)
    assert len({v.speaker for v in espeak_voices}) == len(espeak_voices)
    held = [v for v in espeak_voices if v.held_out]
    assert 0.05 < len(held) / len(espeak_voices) < 0.15


def test_speaker_numbers_and_holdout_are_stable() -> None:
    v = Voice("espeak", "en-us+f3")
    assert v.speaker == Voice("espeak", "en-us+f3").speaker and 10_000_000 <= v.speaker < 100_000_000
    assert v.held_out == Voice("espeak", "en-us+f3").held_out


def test_missing_engine_names_the_apt_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which
    monkeypatch.setattr(synth.shutil, "which", lambda b: None if b == "flite" else real(b))
    with pytest.raises(SynthError, match="flite \\(apt package flite\\)"):
        list_voices(("espeak", "flite"))


def test_splits_share_no_sentences(sentences_file: Path) -> None:
    per_split = {s: set(load_sentences(sentences_file, s)[0]) for s in synth.SPLITS}
    assert all(per_split.values())
    assert not (per_split["train"] & per_split["dev"] or per_split["train"] & per_split["test"])
    assert not per_split["dev"] & per_split["test"]


def test_plan_is_deterministic_and_respects_holdout(sentences_file: Path, espeak_voices: list[Voice]) -> None:
    texts, weights = load_sentences(sentences_file, "train")
    seen = [v for v in espeak_voices if not v.held_out]
    a = plan_jobs(texts, weights, seen, 0.2, "train", seed=5)
    assert a == plan_jobs(texts, weights, seen, 0.2, "train", seed=5)
    assert a != plan_jobs(texts, weights, seen, 0.2, "train", seed=6)
    assert not any(j.voice.held_out for j in a)
    assert len({j.utt_id for j in a}) == len(a)
    rates = [j.prosody.rate for j in a]
    assert min(rates) < 0.8 and max(rates) > 1.05 and all(0.7 <= r <= 1.15 for r in rates)


def test_corpus_layout_and_determinism(tmp_path: Path, sentences_file: Path) -> None:
    kw = dict(hours=0.004, text_path=sentences_file, split="dev", seed=3, engines=("espeak",), progress=False)
    one = build_corpus(tmp_path / "a", jobs=1, **kw)
    two = build_corpus(tmp_path / "b", jobs=2, **kw)
    assert one.utterances == two.utterances >= 2 and not one.failed
    rows = [json.loads(line) for line in one.manifest.read_text().splitlines()]
    assert rows == [json.loads(line) for line in two.manifest.read_text().splitlines()]
    for row in rows:
        flac = tmp_path / "a" / row["audio_filepath"]
        speaker, chapter, name = flac.parent.parent.name, flac.parent.name, flac.stem
        assert name.startswith(f"{speaker}-{chapter}-") and len(name.split("-")[-1]) == 4
        assert flac.read_bytes() == (tmp_path / "b" / row["audio_filepath"]).read_bytes()
        info = sf.info(str(flac))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert info.duration == pytest.approx(row["duration"], abs=1e-3)
        trans = flac.parent / f"{speaker}-{chapter}.trans.txt"
        assert f"{name} {row['text']}" in trans.read_text().splitlines()


def test_heldout_test_split_uses_only_heldout_voices(tmp_path: Path, sentences_file: Path) -> None:
    report = build_corpus(
        tmp_path, 0.003, sentences_file, "test", jobs=2, engines=("espeak",), heldout=True, progress=False
    )
    rows = [json.loads(line) for line in report.manifest.read_text().splitlines()]
    assert report.manifest.name == "test-heldout.jsonl" and rows
    assert {r["voice"] for r in rows} <= set(report.held_out)
    with pytest.raises(SynthError, match="only used by the test split"):
        build_corpus(tmp_path, 0.01, sentences_file, "train", heldout=True, engines=("espeak",))


@pytest.mark.parametrize("engine", ["flite", "festival"])
def test_other_engines_synthesize(tmp_path: Path, sentences_file: Path, engine: str) -> None:
    if not synth.engine_available(engine):
        pytest.fail(f"{engine} is missing: run `make setup`")
    report = build_corpus(tmp_path, 0.002, sentences_file, "train", jobs=2, engines=(engine,), progress=False)
    assert report.utterances >= 1 and not report.failed


def test_cli_list_voices_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from asr.cli import main

    assert main(["synth", "--list-voices", "--engines", "flite"]) == 0
    out = capsys.readouterr().out
    assert "slt" in out and "5 voices (5 flite)" in out
    assert main(["synth", "--list-voices", "--engines", "espeak,nope"]) == 2
    assert "unknown engine" in capsys.readouterr().err
    assert main(["synth", "--hours", "1"]) == 2
    assert "--out" in capsys.readouterr().err
