"""Greedy CTC decoding into timed words and caption segments.

`GreedyCTCDecoder` consumes log-probabilities chunk by chunk, so streaming and offline use the
same code: offline decoding is one `feed` of every frame followed by `flush`. A segment ends at
a pause (a run of frames with no character longer than `pause_s`) or once it reaches
`max_segment_s`, at a word boundary where there is one.

With a `Rescorer` (the language model's `asr.lm.SegmentRescorer`), each finished segment is
decoded again from its frames' log-probabilities before it is returned; partial results stay
greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from asr.features import ENCODER_FRAME_S
from asr.text import BLANK_ID, SPACE_ID, VOCAB

LOOKBACK_FRAMES = 8  # blank frames before a segment's first character that rescoring still sees


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds
    end: float
    conf: float  # mean peak posterior of the word's characters, 0..1

    @staticmethod
    def from_frames(text: str, first: int, last: int, conf: float, frame_s: float) -> Word:
        """The word whose characters span frames first..last (inclusive), its times in seconds."""
        return Word(text, round(first * frame_s, 3), round((last + 1) * frame_s, 3), round(conf, 4))


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...]

    @staticmethod
    def of_words(seg_id: int, words: Sequence[Word]) -> Segment:
        """The segment holding these words (at least one), from the first one's start to the last one's end."""
        return Segment(seg_id, words[0].start, words[-1].end, " ".join(w.word for w in words), tuple(words))


@dataclass(frozen=True)
class Transcript:
    segments: tuple[Segment, ...]
    duration: float  # seconds of audio

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)

    @property
    def words(self) -> tuple[Word, ...]:
        return tuple(w for s in self.segments for w in s.words)


@dataclass(frozen=True)
class SegmenterConfig:
    pause_s: float = 0.8  # a pause this long ends a segment
    max_segment_s: float = 10.0  # a segment this long ends at the next word boundary

    def __post_init__(self) -> None:
        if self.pause_s <= 0 or self.max_segment_s <= 0:
            raise ValueError(f"pause_s and max_segment_s must be positive, got {self}")


class Rescorer(Protocol):
    """Re-decodes a finished segment from the log-probabilities of its frames."""

    def append(self, log_probs: torch.Tensor) -> None:
        """log_probs (L, V): the next L frames, in stream order."""

    def rescore(self, segment: Segment, start: int, end: int) -> Segment:
        """The segment that frames [start, end) decode to; frames before `end` are no longer needed."""

    def trim(self, start: int) -> None:
        """Frames before `start` are no longer needed."""


@dataclass
class _WordInProgress:
    chars: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)  # peak posterior of each character
    start: int = 0  # frame of the first character
    end: int = 0  # last frame on which the last character was the best token


class GreedyCTCDecoder:
    """Incremental greedy CTC decoder for one stream. Frames are numbered from the stream start."""

    def __init__(
        self,
        vocab: tuple[str, ...] = VOCAB,
        config: SegmenterConfig | None = None,
        frame_s: float = ENCODER_FRAME_S,
        rescorer: Rescorer | None = None,
    ) -> None:
        self.vocab = vocab
        self.config = config or SegmenterConfig()
        self.frame_s = frame_s
        self.rescorer = rescorer
        self.frame = 0  # index of the next frame to be fed
        self._segment_start = 0  # first frame of the segment in progress
        self.next_segment_id = 0
        self._prev_token = BLANK_ID
        self._words: list[Word] = []
        self._word: _WordInProgress | None = None
        self._last_char_frame = -1

    def feed(self, log_probs: torch.Tensor) -> list[Segment]:
        """log_probs (L, V) for the next L frames -> the segments these frames completed."""
        log_probs = log_probs.detach().float()
        if self.rescorer is not None:  # it keeps them on the CPU: one transfer for both
            log_probs = log_probs.cpu()
        best_logp, best = log_probs.max(dim=-1)
        return self.feed_best(best_logp.exp().tolist(), best.tolist(), log_probs)

    def feed_best(self, probs: list[float], tokens: list[int], log_probs: torch.Tensor | None = None) -> list[Segment]:
        """`feed` from each frame's best token and its posterior (a server takes the argmax of a whole batch).

        A decoder with a rescorer also needs the frames' log_probs (L, V).
        """
        if self.rescorer is not None:
            if log_probs is None or log_probs.shape[0] != len(tokens):
                raise ValueError("a decoder with a rescorer needs the log-probabilities of every frame it is fed")
            self.rescorer.append(log_probs)
        done: list[Segment] = []
        for prob, token in zip(probs, tokens, strict=True):
            self._step(token, prob, done)
            self.frame += 1
        if self.rescorer is not None:
            self.rescorer.trim(self._segment_start)
        return done

    def flush(self) -> list[Segment]:
        """End of stream (or an explicit endpoint): complete whatever is in progress."""
        done: list[Segment] = []
        self._end_segment(done, self.frame)
        self._prev_token = BLANK_ID
        return done

    def partial(self) -> Segment | None:
        """The segment in progress, words not yet final included; None if it is empty."""
        words = list(self._words)
        if self._word is not None:
            words.append(self._finished_word(self._word))
        return Segment.of_words(self.next_segment_id, words) if words else None

    def _step(self, token: int, prob: float, done: list[Segment]) -> None:
        t = self.frame
        word = self._word
        if token == self._prev_token and word is not None and token not in (BLANK_ID, SPACE_ID):
            word.end = t  # a repeated frame of the same character
            word.probs[-1] = max(word.probs[-1], prob)
        elif token == SPACE_ID and token != self._prev_token:
            self._end_word()
        elif token not in (BLANK_ID, SPACE_ID):
            if word is None:
                word = self._word = _WordInProgress(start=t)
            word.chars.append(self.vocab[token])
            word.probs.append(prob)
            word.end = t
        self._prev_token = token
        if token not in (BLANK_ID, SPACE_ID):
            self._last_char_frame = t
            self._maybe_split_long(done)
        elif not self._has_content():
            self._segment_start = max(self._segment_start, t + 1 - LOOKBACK_FRAMES)
        elif (t - self._last_char_frame) * self.frame_s >= self.config.pause_s:
            self._end_segment(done, t + 1)

    def _has_content(self) -> bool:
        return bool(self._words) or self._word is not None

    def _maybe_split_long(self, done: list[Segment]) -> None:
        first = self._words[0].start if self._words else self._word.start * self.frame_s
        if (self.frame + 1) * self.frame_s - first < self.config.max_segment_s:
            return
        if self._words:  # cut before the word in progress; it opens the next segment
            word, self._word = self._word, None
            self._end_segment(done, word.start)
            self._word = word
        else:  # one word as long as a whole segment: cut it
            self._end_segment(done, self.frame + 1)

    def _finished_word(self, w: _WordInProgress) -> Word:
        return Word.from_frames("".join(w.chars), w.start, w.end, sum(w.probs) / len(w.probs), self.frame_s)

    def _end_word(self) -> None:
        if self._word is not None:
            self._words.append(self._finished_word(self._word))
            self._word = None

    def _end_segment(self, done: list[Segment], cut: int) -> None:
        """End the segment in progress at frame `cut` (exclusive); the next one starts there."""
        self._end_word()
        if self._words:
            segment = Segment.of_words(self.next_segment_id, self._words)
            if self.rescorer is not None:
                segment = self.rescorer.rescore(segment, self._segment_start, cut)
            done.append(segment)
            self.next_segment_id += 1
            self._words = []
        self._segment_start = cut


def decode(
    log_probs: torch.Tensor,
    vocab: tuple[str, ...] = VOCAB,
    config: SegmenterConfig | None = None,
    rescorer: Rescorer | None = None,
) -> Transcript:
    """Offline decoding of one utterance. log_probs (L, V)."""
    decoder = GreedyCTCDecoder(vocab, config, rescorer=rescorer)
    segments = decoder.feed(log_probs) + decoder.flush()
    return Transcript(tuple(segments), duration=log_probs.shape[0] * decoder.frame_s)
