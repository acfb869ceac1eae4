"""Word and character error rates of a model on a data source (`asr eval`).

References and hypotheses both go through `asr.text.normalize`; scoring uses jiwer. Offline
mode runs whole utterances in length-sorted batches; streaming mode feeds each utterance through
the streaming path in `chunk_ms` chunks. Both give the same hypotheses (a test proves it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import jiwer
import torch
from tqdm import tqdm

from asr.audio import AudioError, load_audio
from asr.data import Utterance
from asr.decoding import decode
from asr.features import SAMPLE_RATE
from asr.lm import BeamSearch, SegmentRescorer
from asr.model import ASRModel
from asr.recognizer import StreamRecognizer, batch_log_probs
from asr.text import VOCAB, normalize

MODES = ("offline", "streaming")


@dataclass(frozen=True)
class ErrorCounts:
    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def ref_len(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """Errors over reference length; an empty reference with insertions counts as 100 %."""
        if self.ref_len == 0:
            return float(self.insertions > 0)
        return self.errors / self.ref_len

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def _counts(ref: list[str], hyp: list[str]) -> tuple[ErrorCounts, str]:
    """Counts and a printable alignment, for tokens (words, or characters with '_' for spaces)."""
    if not ref:
        return ErrorCounts(insertions=len(hyp)), f"REF:\nHYP: {' '.join(hyp)}"
    if not hyp:
        return ErrorCounts(deletions=len(ref)), f"REF: {' '.join(ref)}\nHYP:"
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    alignment = jiwer.visualize_alignment(out, show_measures=False, skip_correct=False)
    body = "\n".join(line for line in alignment.splitlines() if line.startswith(("REF:", "HYP:", "   ")))
    return ErrorCounts(out.hits, out.substitutions, out.deletions, out.insertions), body


def score(ref: str, hyp: str) -> tuple[ErrorCounts, ErrorCounts, str]:
    """(word counts, character counts, word alignment) of one normalized pair."""
    words, alignment = _counts(ref.split(), hyp.split())
    chars, _ = _counts(list(ref.replace(" ", "_")), list(hyp.replace(" ", "_")))
    return words, chars, alignment


@dataclass(frozen=True)
class UtteranceResult:
    id: str
    ref: str
    hyp: str
    duration: float
    words: ErrorCounts
    chars: ErrorCounts
    alignment: str


@dataclass(frozen=True)
class EvalSummary:
    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int
    utterances: int
    failed: int
    hours: float
    rtfx: float  # seconds of audio per second of processing (model and decoding)
    mode: str
    decoder: str = "greedy"  # or "lm" (lexicon beam search with the word LM)
    dtype: str = "float32"  # the model's (`asr eval --dtype`)

    def to_json(self) -> dict:
        return asdict(self)

    def report(self, data: str, skipped: int = 0) -> str:
        """The printed summary; its last line is `WER <x.xx>% on <n> utterances (<h.hh> h)`."""
        return "\n".join(
            [
                f"data:        {data} ({self.mode}, {self.decoder} decoding, {self.dtype})",
                f"WER:         {100 * self.wer:.2f}%  (S={self.substitutions} D={self.deletions} "
                f"I={self.insertions} N={self.ref_words})",
                f"CER:         {100 * self.cer:.2f}%",
                f"utterances:  {self.utterances} scored, {self.failed + skipped} skipped",
                f"audio:       {self.hours:.2f} h, RTFx {self.rtfx:.0f}",
                f"WER {100 * self.wer:.2f}% on {self.utterances} utterances ({self.hours:.2f} h)",
            ]
        )


def _streaming(model: ASRModel, audio: torch.Tensor, device: torch.device, chunk_ms: int) -> torch.Tensor:
    rec = StreamRecognizer(model, device)
    step = max(1, chunk_ms * SAMPLE_RATE // 1000)
    pieces = [rec.accept(audio[i : i + step]) for i in range(0, audio.numel(), step)]
    return torch.cat([*pieces, rec.finish()])


def _batches(utts: Sequence[Utterance], max_seconds: float) -> Iterator[list[Utterance]]:
    """Length-sorted groups for offline batching (padding stays small)."""
    batch: list[Utterance] = []
    for u in sorted(utts, key=lambda u: u.duration):
        if batch and (len(batch) + 1) * u.duration > max_seconds:
            yield batch
            batch = []
        batch.append(u)
    if batch:
        yield batch


def evaluate(
    model: ASRModel,
    utts: Sequence[Utterance],
    mode: str = "offline",
    device: torch.device | str = "cpu",
    chunk_ms: int = 640,
    vocab: tuple[str, ...] = VOCAB,
    batch_seconds: float = 200.0,
    progress: bool = False,
    on_error: Callable[[str], None] | None = None,
    search: BeamSearch | None = None,
) -> tuple[EvalSummary, list[UtteranceResult]]:
    """Decode every utterance and score it. An unreadable one is passed to `on_error` and skipped.

    With `search`, each caption segment is decoded again with its language model.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    results: list[UtteranceResult] = []
    failed = 0
    compute_s = 0.0
    bar = tqdm(total=len(utts), unit="utt", desc=f"eval ({mode})", disable=not progress)
    for group in _batches(utts, batch_seconds if mode == "offline" else 0.0):
        loaded = []
        for u in group:
            try:
                loaded.append((u, load_audio(u.audio)))
            except AudioError as e:
                failed += 1
                if on_error is not None:
                    on_error(f"{u.id}: {e}")
        start = time.perf_counter()
        if mode == "offline":
            log_probs = batch_log_probs(model, [a for _, a in loaded], device) if loaded else []
        else:
            log_probs = [_streaming(model, a, device, chunk_ms) for _, a in loaded]
        hyps = [decode(lp.cpu(), vocab, rescorer=SegmentRescorer(search) if search else None) for lp in log_probs]
        compute_s += time.perf_counter() - start
        for (u, audio), transcript in zip(loaded, hyps, strict=True):
            ref, hyp = normalize(u.text), normalize(transcript.text)
            words, chars, alignment = score(ref, hyp)
            results.append(UtteranceResult(u.id, ref, hyp, audio.numel() / SAMPLE_RATE, words, chars, alignment))
        bar.update(len(group))
    bar.close()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return summarize(results, failed, compute_s, mode, "greedy" if search is None else "lm", dtype), results


def summarize(
    results: Sequence[UtteranceResult],
    failed: int,
    compute_s: float,
    mode: str,
    decoder: str = "greedy",
    dtype: str = "float32",
) -> EvalSummary:
    words = sum((r.words for r in results), ErrorCounts())
    chars = sum((r.chars for r in results), ErrorCounts())
    seconds = sum(r.duration for r in results)
    return EvalSummary(
        wer=words.errors / max(1, words.ref_len),
        cer=chars.errors / max(1, chars.ref_len),
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
        ref_words=words.ref_len,
        utterances=len(results),
        failed=failed,
        hours=seconds / 3600,
        rtfx=seconds / compute_s if compute_s > 0 else 0.0,
        mode=mode,
        decoder=decoder,
        dtype=dtype,
    )


def write_errors(results: Sequence[UtteranceResult], path: Path) -> None:
    """Per-utterance alignments, worst first (most word errors, then highest WER)."""
    ranked = sorted(results, key=lambda r: (-r.words.errors, -r.words.rate, r.id))
    with path.open("w", encoding="utf-8") as f:
        for r in ranked:
            w = r.words
            f.write(
                f"{r.id}  WER {100 * w.rate:.1f}%  (S={w.substitutions} D={w.deletions} I={w.insertions} "
                f"N={w.ref_len})\n{r.alignment}\n\n"
            )
