import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.data import (
    DataError,
    DataSource,
    SpeechDataset,
    Utterance,
    bucket_batches,
    collate,
    mix,
    read_librispeech,
    read_manifest,
    read_source,
    read_transcripts_tsv,
    split_by_speaker,
)
from asr.text import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"


def _write_tsv(corpus: Path, dest: Path) -> Path:
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    lines = ["utt_id\tpath\tduration_s\tspeaker\ttext"]
    for r in rows:
        audio = (corpus / r["audio_filepath"]).resolve()
        lines.append(f"{Path(r['audio_filepath']).stem}\t{audio}\t{r['duration']}\t{r['speaker']}\t{r['text']}")
    path = dest / "transcripts.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_reader_sees_the_same_corpus(tiny_corpus: Path, tmp_path: Path) -> None:
    libri = read_librispeech(tiny_corpus.parent)  # from LibriSpeech/, one level above the split
    manifest = read_manifest(tiny_corpus / "train.jsonl")
    tsv = read_transcripts_tsv(_write_tsv(tiny_corpus, tmp_path))
    key = lambda s: sorted((u.id, u.text, round(u.duration, 2), u.audio.resolve()) for u in s.utterances)  # noqa: E731
    assert key(libri) == key(manifest) == key(tsv) and len(libri.utterances) >= 4
    assert not (libri.skipped or manifest.skipped or tsv.skipped)
    assert read_source(tiny_corpus).utterances == libri.utterances
    assert read_source(tiny_corpus / "train.jsonl").utterances == manifest.utterances


def test_librispeech_odd_cases(tmp_path: Path) -> None:
    chapter = tmp_path / "LibriSpeech" / "dev-odd" / "19" / "198"
    chapter.mkdir(parents=True)
    for i in range(3):
        if i != 1:  # 19-198-0001 has no audio file
            sf.write(str(chapter / f"19-198-000{i}.flac"), np.zeros(8000, np.float32), 16000)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 hello, World\n19-198-0001 MISSING AUDIO\n19-198-0002\n\n")
    source = read_source(tmp_path / "LibriSpeech")
    assert [(u.id, u.text, u.speaker) for u in source.utterances] == [
        ("19-198-0000", "HELLO WORLD", "19"),
        ("19-198-0002", "", "19"),  # an empty transcript is kept: silence is a valid utterance
    ]
    assert len(source.skipped) == 1 and "no audio file for 19-198-0001" in source.skipped[0]
    assert source.utterances[0].duration == pytest.approx(0.5)


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.trans.txt"):
        read_source(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio_filepath": "a.wav", "text": "A"}\n{broken\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_source(bad)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        read_source(tmp_path / "x.csv")


def test_shared_fsdd_tsv_is_read_and_decoded() -> None:
    source = read_source(SHARED / "fsdd")
    assert len(source.utterances) == 3000 and not source.skipped
    utt = source.utterances[0]
    assert utt.text in {"ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"}
    item = SpeechDataset([utt])[0]
    assert item is not None and abs(item[1].numel() / 16000 - utt.duration) < 0.05  # 8 kHz -> 16 kHz


def _utts(durations: list[float]) -> list[Utterance]:
    return [Utterance(f"u{i}", Path(f"/x/u{i}.flac"), "A", d, f"s{i % 5}") for i, d in enumerate(durations)]


def test_mix_weights() -> None:
    a, b = DataSource("a", tuple(_utts([1.0] * 10))), DataSource("b", tuple(_utts([2.0] * 20)))
    epoch = mix([a, b], [2.0, 0.5], random.Random(0))
    assert len(epoch) == 2 * 10 + 10
    assert sum(u.duration == 1.0 for u in epoch) == 20
    with pytest.raises(DataError):
        mix([a, b], [1.0], random.Random(0))


def test_split_by_speaker() -> None:
    source = DataSource("s", tuple(_utts([1.0] * 10)))
    rest, dev = split_by_speaker(source, ["s0", "s1"])
    assert {u.speaker for u in dev.utterances} == {"s0", "s1"} and len(rest.utterances) == 6


def test_bucket_batches_cap_and_cover() -> None:
    rng = random.Random(1)
    utts = _utts([rng.uniform(0.5, 15) for _ in range(500)] + [40.0])
    batches = bucket_batches(utts, 60.0, random.Random(7))
    assert sorted(u.id for b in batches for u in b) == sorted(u.id for u in utts)
    for b in batches:
        assert len(b) == 1 or len(b) * max(u.duration for u in b) <= 60.0
    spreads = [max(u.duration for u in b) - min(u.duration for u in b) for b in batches]
    assert np.median(spreads) < 1.5  # similar lengths together
    assert [[u.id for u in b] for b in batches] == [
        [u.id for u in b] for b in bucket_batches(utts, 60.0, random.Random(7))
    ]


def test_dataset_and_collate(tiny_corpus: Path, tmp_path: Path) -> None:
    utts = list(read_source(tiny_corpus).utterances[:3])
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC but not really")
    utts.append(Utterance("broken", broken, "A B", 1.0))
    ds = SpeechDataset(utts, Tokenizer())
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.audio.shape[0] == 3 and batch.ids == [u.id for u in utts[:3]]
    assert batch.audio_lengths.max() == batch.audio.shape[1]
    for i, u in enumerate(utts[:3]):
        assert Tokenizer().decode(batch.targets[i, : batch.target_lengths[i]].tolist()) == u.text
        assert batch.audio[i, batch.audio_lengths[i] :].abs().sum() == 0


@pytest.mark.gpu
def test_loader_pins_batches_so_copies_to_the_gpu_do_not_block(tiny_corpus: Path) -> None:
    ds = SpeechDataset(read_source(tiny_corpus).utterances[:4], Tokenizer())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, pin_memory=True)))
    assert batch.audio.is_pinned() and batch.audio_lengths.is_pinned() and batch.targets.is_pinned()


def test_dataset_augmentation_is_reproducible(tiny_corpus: Path) -> None:
    utts = read_source(tiny_corpus).utterances[:1]
    noisy = lambda a, rng: a + torch.from_numpy(rng.standard_normal(a.numel()).astype(np.float32))  # noqa: E731
    ds = SpeechDataset(utts, augment=noisy, seed=3)
    first, again = ds[0][1], ds[0][1]
    ds.epoch = 1
    assert torch.equal(first, again) and not torch.equal(first, ds[0][1])
