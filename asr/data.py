"""Speech datasets: readers for three layouts, weighted mixing, and duration-bucketed batches.

Sources:
- a LibriSpeech root: every `*/*/*.trans.txt` beneath it (`LibriSpeech/test-clean`, a whole
  `LibriSpeech/`, or a corpus from `asr synth`);
- a NeMo-style JSONL manifest: `{"audio_filepath", "duration", "text", ...}` per line, with
  relative paths taken from the manifest's folder;
- the `transcripts.tsv` of `../shared/data/speech`: `utt_id path duration_s speaker text`.

Every reader normalises the text with `asr.text.normalize`, so references match hypotheses.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from asr.audio import AudioError, audio_info, load_audio
from asr.text import Tokenizer, normalize

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3")


class DataError(Exception):
    """A data source that cannot be read at all (missing path, unknown layout, bad syntax)."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    text: str  # normalized
    duration: float  # seconds
    speaker: str = ""


@dataclass(frozen=True)
class DataSource:
    """What a reader found: the usable utterances and one line for each entry it skipped."""

    name: str
    utterances: tuple[Utterance, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def hours(self) -> float:
        return sum(u.duration for u in self.utterances) / 3600


def _duration(path: Path) -> float:
    return audio_info(path).duration


def _find_audio(folder: Path, utt_id: str) -> Path | None:
    for ext in AUDIO_EXTENSIONS:
        candidate = folder / f"{utt_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def read_librispeech(root: Path) -> DataSource:
    """Every `speaker/chapter/speaker-chapter.trans.txt` beneath `root` (at any depth)."""
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise DataError(f"{root}: no *.trans.txt files beneath it (not a LibriSpeech-style root)")
    utts, skipped = [], []
    for trans in transcripts:
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = _find_audio(trans.parent, utt_id)
            if audio is None:
                skipped.append(f"{trans}:{n}: no audio file for {utt_id}")
                continue
            try:
                utts.append(Utterance(utt_id, audio, normalize(text), _duration(audio), trans.parent.parent.name))
            except AudioError as e:
                skipped.append(f"{trans}:{n}: {e}")
    return DataSource(str(root), tuple(utts), tuple(skipped))


def read_manifest(path: Path) -> DataSource:
    """A NeMo-style JSONL manifest."""
    utts, skipped = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio = Path(row["audio_filepath"])
            text, duration = row["text"], float(row.get("duration", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{n}: not a manifest line ({e!r}); need audio_filepath and text") from e
        audio = audio if audio.is_absolute() else path.parent / audio
        if not audio.is_file():
            skipped.append(f"{path}:{n}: no audio file {audio}")
            continue
        utt_id = str(row.get("utt_id", audio.stem))
        utts.append(Utterance(utt_id, audio, normalize(text), duration, str(row.get("speaker", ""))))
    return DataSource(str(path), tuple(utts), tuple(skipped))


def read_transcripts_tsv(path: Path) -> DataSource:
    """The `transcripts.tsv` of `../shared/data/speech/*`."""
    utts, skipped = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        need = {"utt_id", "path", "duration_s", "speaker", "text"}
        if not need <= set(reader.fieldnames or ()):
            raise DataError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for n, row in enumerate(reader, start=2):
            audio = path.parent / row["path"]
            if not audio.is_file():
                skipped.append(f"{path}:{n}: no audio file {audio}")
                continue
            utts.append(
                Utterance(row["utt_id"], audio, normalize(row["text"] or ""), float(row["duration_s"]), row["speaker"])
            )
    return DataSource(str(path), tuple(utts), tuple(skipped))


def read_source(path: str | Path) -> DataSource:
    """Pick the reader from what `path` is: a folder, a .jsonl/.json manifest or a .tsv."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        if (path / "transcripts.tsv").is_file():
            return read_transcripts_tsv(path / "transcripts.tsv")
        return read_librispeech(path)
    if path.suffix in (".jsonl", ".json"):
        return read_manifest(path)
    if path.suffix == ".tsv":
        return read_transcripts_tsv(path)
    raise DataError(f"{path}: unknown data format (a LibriSpeech folder, a .jsonl manifest or a transcripts.tsv)")


def split_by_speaker(source: DataSource, held_out: Sequence[str]) -> tuple[DataSource, DataSource]:
    """(rest, held-out speakers): e.g. speechocean762 speakers kept aside as a dev set."""
    held = set(held_out)
    keep = tuple(u for u in source.utterances if u.speaker not in held)
    dev = tuple(u for u in source.utterances if u.speaker in held)
    return DataSource(source.name, keep, source.skipped), DataSource(f"{source.name} (held out)", dev)


def mix(sources: Sequence[DataSource], weights: Sequence[float], rng: random.Random) -> list[Utterance]:
    """One epoch of a weighted mix: source i contributes weight_i x its size, drawn without
    replacement while it lasts (a weight above 1 repeats the source, below 1 subsamples it)."""
    if len(sources) != len(weights) or any(w < 0 for w in weights):
        raise DataError(f"need one non-negative weight per source, got {list(weights)} for {len(sources)} sources")
    epoch: list[Utterance] = []
    for source, weight in zip(sources, weights, strict=True):
        utts = list(source.utterances)
        whole, frac = divmod(weight, 1.0)
        for _ in range(int(whole)):
            epoch += utts
        epoch += rng.sample(utts, round(frac * len(utts)))
    return epoch


def bucket_batches(
    utts: Sequence[Utterance], max_batch_seconds: float, rng: random.Random, num_buckets: int = 20
) -> list[list[Utterance]]:
    """Duration-bucketed dynamic batches: similar lengths together, and each batch's padded size
    (batch size x its longest utterance) at most `max_batch_seconds`. An utterance longer than
    the cap gets a batch of its own. Batch order is shuffled."""
    if max_batch_seconds <= 0:
        raise DataError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
    ordered = sorted(utts, key=lambda u: u.duration)
    per_bucket = max(1, math.ceil(len(ordered) / num_buckets))
    batches: list[list[Utterance]] = []
    for start in range(0, len(ordered), per_bucket):
        bucket = ordered[start : start + per_bucket]
        rng.shuffle(bucket)
        bucket.sort(key=lambda u: u.duration)  # stable sort keeps the shuffle among equal lengths
        batch: list[Utterance] = []
        for u in bucket:
            if batch and (len(batch) + 1) * max(u.duration, batch[-1].duration) > max_batch_seconds:
                batches.append(batch)
                batch = []
            batch.append(u)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    audio: torch.Tensor  # (B, N) float32, zero padded
    audio_lengths: torch.Tensor  # (B,) samples
    targets: torch.Tensor  # (B, S) token ids, zero padded
    target_lengths: torch.Tensor  # (B,)
    ids: list[str]

    def pin_memory(self) -> Batch:
        """The batch with the tensors that go to the GPU in page-locked memory. A DataLoader with `pin_memory=True`
        calls this in its pinning thread; without it the batch stays pageable, and each copy to the GPU then
        blocks the host (about 20 ms for 1,400 s of audio on an H200 host)."""
        pinned = (self.audio, self.audio_lengths, self.targets)
        audio, audio_lengths, targets = (t.pin_memory() for t in pinned)
        return replace(self, audio=audio, audio_lengths=audio_lengths, targets=targets)


class SpeechDataset(torch.utils.data.Dataset):
    """Decodes audio (soundfile, resampled to 16 kHz), augments it, and tokenizes the text.

    `augment(audio, rng) -> audio` gets a numpy Generator seeded from (seed, epoch, index), so
    an epoch is reproducible. `load(path)` reads audio (default: decode the file). An unreadable
    file yields None; `collate` drops it.
    """

    def __init__(
        self,
        utts: Sequence[Utterance],
        tokenizer: Tokenizer | None = None,
        augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
        seed: int = 0,
        load: Callable[[Path], torch.Tensor] = load_audio,
    ) -> None:
        self.utts = list(utts)
        self.tokenizer = tokenizer or Tokenizer()
        self.augment = augment
        self.load = load
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, list[int]] | None:
        utt = self.utts[index]
        try:
            audio = self.load(utt.audio)
        except AudioError:
            return None
        if self.augment is not None:
            audio = self.augment(audio, np.random.default_rng([self.seed, self.epoch, index]))
        return utt.id, audio, self.tokenizer.encode(utt.text)


def collate(items: Sequence[tuple[str, torch.Tensor, list[int]] | None]) -> Batch:
    items = [it for it in items if it is not None]
    audio_lengths = torch.tensor([a.numel() for _, a, _ in items], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for *_, t in items], dtype=torch.long)
    audio = torch.zeros(len(items), int(audio_lengths.max()) if items else 0)
    targets = torch.zeros(len(items), int(target_lengths.max()) if items else 0, dtype=torch.long)
    for i, (_, a, t) in enumerate(items):
        audio[i, : a.numel()] = a
        targets[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return Batch(audio, audio_lengths, targets, target_lengths, [utt_id for utt_id, *_ in items])
