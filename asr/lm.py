"""Word language model: lexicon beam search over CTC log-probabilities with a KenLM n-gram.

A model directory may bundle `lm/` beside its weights:

    lm/lm.bin        KenLM model (binary, or ARPA text)
    lm/lexicon.txt   one word per line, then its spelling: `HELLO H E L L O |`
    lm/decoder.json  the `BeamConfig` the weights were tuned with

The search is flashlight-text's lexicon decoder (through torchaudio's `ctc_decoder`). It only
ever writes words of the lexicon. Greedy decoding still places the caption segments and the
partial results; each finished segment's frames are then decoded again with the LM
(`SegmentRescorer`), so streaming and offline decoding give the same words.

`build_lm` makes `lm/` from text with KenLM's `lmplz` and `build_binary`, which are not Python
packages: `scripts/build_kenlm.sh` builds them.
"""

from __future__ import annotations

import json
import lzma
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torchaudio.models.decoder import CTCDecoder, ctc_decoder

from asr.decoding import Segment, Word
from asr.features import ENCODER_FRAME_S
from asr.synth import read_lines
from asr.text import BLANK_ID, SPACE_ID, VOCAB, normalize

LM_DIR = "lm"
LM_FILE = "lm.bin"
LEXICON_FILE = "lexicon.txt"
DECODER_FILE = "decoder.json"
_BLANK_TOKEN = "-"  # the names flashlight sees for our blank and space tokens
_SIL_TOKEN = "|"
_IMPOSSIBLE = -1e4  # log-probability of the tokens of the appended end-of-segment frame other than space


class LMError(Exception):
    """A missing or unreadable language model, or a failed build."""


@dataclass(frozen=True)
class BeamConfig:
    beam_size: int = 64  # hypotheses kept per frame
    beam_threshold: float = 25.0  # drop hypotheses this far below the best
    lm_weight: float = 2.0  # weight of the LM log-probability
    word_score: float = 0.0  # bonus per word
    unk_score: float = float("-inf")  # out-of-lexicon words: never

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.beam_threshold <= 0:
            raise ValueError(f"beam_size must be >= 1 and beam_threshold > 0, got {self}")

    @classmethod
    def from_json(cls, path: Path) -> BeamConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LMError(f"{path}: {e}") from e
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise LMError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**raw)

    @classmethod
    def of(cls, lm_dir: Path) -> BeamConfig:
        """An LM directory's decoder settings: its decoder.json, or the defaults if it has none."""
        path = Path(lm_dir) / DECODER_FILE
        return cls.from_json(path) if path.is_file() else cls()


def _tokens(vocab: tuple[str, ...]) -> list[str]:
    return [_BLANK_TOKEN if i == BLANK_ID else _SIL_TOKEN if i == SPACE_ID else t for i, t in enumerate(vocab)]


class BeamSearch:
    """Lexicon beam search with an n-gram LM over one utterance's log-probabilities."""

    def __init__(self, lm_dir: Path, config: BeamConfig | None = None, vocab: tuple[str, ...] = VOCAB) -> None:
        lm_dir = Path(lm_dir)
        for name in (LM_FILE, LEXICON_FILE):
            if not (lm_dir / name).is_file():
                raise LMError(f"language model incomplete: {lm_dir / name} not found")
        self.lm_dir = lm_dir
        self.config = config or BeamConfig.of(lm_dir)
        self.vocab = vocab
        self._decoder: CTCDecoder = ctc_decoder(
            lexicon=str(lm_dir / LEXICON_FILE),
            tokens=_tokens(vocab),
            lm=str(lm_dir / LM_FILE),
            beam_size=self.config.beam_size,
            beam_threshold=self.config.beam_threshold,
            lm_weight=self.config.lm_weight,
            word_score=self.config.word_score,
            unk_score=self.config.unk_score,
            blank_token=_BLANK_TOKEN,
            sil_token=_SIL_TOKEN,
        )

    def words(self, log_probs: torch.Tensor) -> list[tuple[str, int, int, float]]:
        """log_probs (L, V) -> (word, first frame, last frame, confidence) of the best hypothesis.

        Confidence is the mean posterior of the word's characters at the frames where they fire.
        """
        if log_probs.shape[0] == 0:
            return []
        emissions = log_probs.detach().float().cpu()
        # a segment ends at a word boundary, but the model writes no space after its last word: one
        # certain space frame lets the lexicon's last word (spelled with its trailing space) complete
        end = torch.full((1, emissions.shape[1]), _IMPOSSIBLE)
        end[0, SPACE_ID] = 0.0
        hyp = self._decoder(torch.cat([emissions, end]).unsqueeze(0))[0][0]
        words: list[tuple[str, int, int, float]] = []
        chars: list[tuple[int, int]] = []  # (token, frame) of the word being read
        # flashlight's token sequence has a leading sentinel: timestep i is frame i - 1
        for token, step in zip(hyp.tokens.tolist(), hyp.timesteps.tolist(), strict=True):
            if token == SPACE_ID:
                self._close_word(chars, emissions, words)
            elif token != BLANK_ID:
                chars.append((token, step - 1))
        self._close_word(chars, emissions, words)
        return words

    def _close_word(
        self, chars: list[tuple[int, int]], emissions: torch.Tensor, words: list[tuple[str, int, int, float]]
    ) -> None:
        if not chars:
            return
        text = "".join(self.vocab[t] for t, _ in chars)
        conf = sum(emissions[f, t].exp().item() for t, f in chars) / len(chars)
        words.append((text, chars[0][1], chars[-1][1], conf))
        chars.clear()


@dataclass(frozen=True)
class RescoreJob:
    """A finished segment and the log-probabilities of its frames, to be decoded again."""

    segment: Segment  # as greedy decoding wrote it
    start: int  # stream frame of log_probs[0]
    log_probs: torch.Tensor  # (L, V)

    def result(self, words: list[tuple[str, int, int, float]], frame_s: float = ENCODER_FRAME_S) -> Segment:
        """The segment with the beam search's `words` (frames relative to `start`), or greedy's if none."""
        if not words:  # the LM found no word where greedy decoding did: keep greedy's
            return self.segment
        timed = [Word.from_frames(w, self.start + a, self.start + b, c, frame_s) for w, a, b, c in words]
        return Segment.of_words(self.segment.id, timed)


class SegmentRescorer:
    """One stream's `asr.decoding.Rescorer`: keeps the log-probs of the segment in progress only, and
    decodes each finished segment again with `search`.

    Without a `search` (`deferred`), it only collects the `RescoreJob`s, returns greedy's segments,
    and `take_jobs()` hands the jobs to whoever decodes them elsewhere (`RescorePool`).
    """

    def __init__(self, search: BeamSearch | None, frame_s: float = ENCODER_FRAME_S, vocab_size: int = len(VOCAB)):
        self.search = search
        self.frame_s = frame_s
        self.vocab_size = vocab_size
        self.jobs: list[RescoreJob] = []  # deferred: finished segments not yet taken
        self._chunks: list[torch.Tensor] = []  # (L_i, V) each, float32 on the CPU
        self._first = 0  # stream frame of the first buffered frame

    @property
    def buffered_frames(self) -> int:
        return sum(c.shape[0] for c in self._chunks)

    def append(self, log_probs: torch.Tensor) -> None:
        if log_probs.shape[0]:
            self._chunks.append(log_probs.detach().float().cpu())

    def trim(self, start: int) -> None:
        """Drop the frames before stream frame `start`: whole chunks, then the head of the first one kept (a view;
        no copy: a silent stream trims after every step)."""
        drop = start - self._first
        if drop <= 0:
            return
        while self._chunks and drop >= self._chunks[0].shape[0]:
            drop -= self._chunks.pop(0).shape[0]
        if self._chunks:
            self._chunks[0] = self._chunks[0][drop:]
        self._first = start

    def rescore(self, segment: Segment, start: int, end: int) -> Segment:
        start = max(start, self._first)
        job = RescoreJob(segment, start, self._buffer()[start - self._first : end - self._first])
        self.trim(end)
        if self.search is None:
            self.jobs.append(job)
            return segment
        return job.result(self.search.words(job.log_probs), self.frame_s)

    def take_jobs(self) -> list[RescoreJob]:
        jobs, self.jobs = self.jobs, []
        return jobs

    def _buffer(self) -> torch.Tensor:
        if len(self._chunks) > 1:
            self._chunks = [torch.cat(self._chunks)]
        return self._chunks[0] if self._chunks else torch.zeros(0, self.vocab_size)


_pool_search: BeamSearch | None = None  # in a RescorePool process: its own beam search


def _init_pool_process(lm_dir: Path, config: BeamConfig) -> None:
    global _pool_search
    torch.set_num_threads(1)
    _pool_search = BeamSearch(lm_dir, config)


def _pool_words(log_probs: torch.Tensor) -> list[tuple[str, int, int, float]]:
    return _pool_search.words(log_probs)


class RescorePool:
    """Beam searches in `processes` worker processes, so that a server's batcher thread never waits for
    one (flashlight holds Python's interpreter lock while it decodes). Each process loads the LM."""

    def __init__(self, search: BeamSearch, processes: int) -> None:
        self._search, self._processes = search, processes
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._processes,
            mp_context=mp.get_context("spawn"),
            initializer=_init_pool_process,
            initargs=(self._search.lm_dir, self._search.config),
        )

    def submit(self, job: RescoreJob) -> Future:
        """A future of the job's words (`BeamSearch.words`). If a process has died, the executor refuses every
        job from then on: a fresh one takes its place (the jobs it lost fail, and their callers keep greedy's
        finals)."""
        try:
            return self._pool.submit(_pool_words, job.log_probs)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start()
            return self._pool.submit(_pool_words, job.log_probs)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def find_lm(model_dir: Path | None) -> Path | None:
    """The model's bundled `lm/` directory, or None if it has none."""
    if model_dir is None:
        return None
    lm_dir = Path(model_dir) / LM_DIR
    return lm_dir if (lm_dir / LM_FILE).is_file() else None


# ---------------------------------------------------------------- building


def lm_sentences(paths: Iterable[Path], keep: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Normalized, de-duplicated lines of text files (.xz ok), optionally only those `keep` accepts.

    `keep` is a predicate on the normalized line (the default model keeps the training split only,
    so that no held-out test sentence is in its LM).
    """
    seen: set[str] = set()
    for path in paths:
        try:
            for line in read_lines(path):
                text = normalize(line.split("\t")[-1])
                if text and text not in seen and (keep is None or keep(text)):
                    seen.add(text)
                    yield text
        except (OSError, lzma.LZMAError, UnicodeDecodeError) as e:
            raise LMError(f"cannot read {path}: {e}") from e


def word_list(paths: Iterable[Path]) -> list[str]:
    """The words of word-list files (one a line, .xz ok, e.g. Debian's /usr/share/dict/american-english),
    normalized like training targets (`lm_sentences`); entries that normalize to several words are left out."""
    return sorted(line for line in lm_sentences(paths) if " " not in line)


def write_lexicon(words: Iterable[str], path: Path) -> int:
    """One `WORD W O R D |` line per word (a word ends with a space); returns the number of words."""
    lines = [f"{w} {' '.join(w)} {_SIL_TOKEN}\n" for w in sorted(set(words))]
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def _tool(name: str, kenlm_bin: Path | None) -> str:
    """`kenlm_bin/name`, or else `name` on PATH or beside this Python (`make setup` puts it in .venv/bin)."""
    search = (
        str(kenlm_bin) if kenlm_bin else os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    )
    found = shutil.which(name, path=search)
    if found is None:
        raise LMError(f"KenLM's {name} not found in {kenlm_bin or 'PATH'}: build it with scripts/build_kenlm.sh")
    return found


def _run(cmd: list[str], stdin=None, stdout=subprocess.DEVNULL) -> None:
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False, stdin=stdin, stdout=stdout)
    if done.returncode != 0:
        raise LMError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


@dataclass(frozen=True)
class LMSummary:
    sentences: int
    words: int  # running words of text
    lexicon: int  # distinct words
    order: int
    size_bytes: int
    added_words: int = 0  # words of the word lists that the text lacked


def build_lm(
    sentences: Iterable[str],
    out: Path,
    order: int = 4,
    prune: tuple[int, ...] = (0, 0, 1, 1),
    config: BeamConfig | None = None,
    kenlm_bin: Path | None = None,
    extra_words: Iterable[str] = (),
) -> LMSummary:
    """Write `out` (an `lm/` directory) from normalized sentences with KenLM.

    `prune` gives lmplz's count thresholds per order (0: keep all); the default drops 3- and
    4-grams seen once, which keeps the default model's LM at a few MB. Each of `extra_words` that the
    sentences lack goes into the LM as a sentence of its own (so it gets the unigram probability of a word
    seen once, where an unknown word would get KenLM's <unk>) and into the lexicon.
    """
    if order < 2 or len(prune) > order:
        raise LMError(f"order must be >= 2 and prune at most `order` thresholds, got {order}, {prune}")
    lmplz, build_binary = _tool("lmplz", kenlm_bin), _tool("build_binary", kenlm_bin)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        text, arpa = Path(tmp) / "text.txt", Path(tmp) / "lm.arpa"
        with text.open("w", encoding="utf-8") as f:
            for s in sentences:
                f.write(s + "\n")
                counts.update(s.split())
                n += 1
            if n == 0:
                raise LMError("no text to build a language model from")
            running_words = sum(counts.values())
            added = [w for w in dict.fromkeys(extra_words) if w not in counts]
            f.writelines(w + "\n" for w in added)
            counts.update(added)
        prune_args = ["--prune", *map(str, prune)] if any(prune) else []
        with text.open() as stdin, arpa.open("w") as stdout:
            _run(
                [lmplz, "-o", str(order), "-S", "20%", "-T", tmp, "--discount_fallback", *prune_args],
                stdin=stdin,
                stdout=stdout,
            )
        _run([build_binary, "-q", "8", "-b", "8", "-a", "22", "trie", str(arpa), str(out / LM_FILE)])
    lexicon = write_lexicon(counts, out / LEXICON_FILE)
    (out / DECODER_FILE).write_text(json.dumps(asdict(config or BeamConfig()), indent=2) + "\n")
    return LMSummary(n, running_words, lexicon, order, (out / LM_FILE).stat().st_size, len(added))
