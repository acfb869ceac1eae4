"""Transcript writers: txt, srt, vtt and json, named after the input file as whisper does.

Captions follow the usual subtitle rules: at most two lines of at most 42 characters per cue,
cues numbered from 1 (SRT), `HH:MM:SS,mmm` (SRT) and `HH:MM:SS.mmm` (WebVTT) timestamps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from asr.decoding import Transcript, Word

MAX_LINE_CHARS = 42
MAX_CUE_LINES = 2


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    lines: tuple[str, ...]


def format_timestamp(seconds: float, decimal_marker: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal_marker}{ms:03d}"


def _wrap(words: Iterable[Word], width: int) -> list[list[Word]]:
    """Greedy line filling; a word longer than `width` gets a line to itself."""
    lines: list[list[Word]] = []
    length = 0
    for w in words:
        if lines and length + 1 + len(w.word) <= width:
            lines[-1].append(w)
            length += 1 + len(w.word)
        else:
            lines.append([w])
            length = len(w.word)
    return lines


def caption_cues(transcript: Transcript) -> list[Cue]:
    """Each segment becomes one or more cues of at most MAX_CUE_LINES wrapped lines."""
    cues = []
    for segment in transcript.segments:
        lines = _wrap(segment.words, MAX_LINE_CHARS)
        for i in range(0, len(lines), MAX_CUE_LINES):
            group = lines[i : i + MAX_CUE_LINES]
            text = tuple(" ".join(w.word for w in line) for line in group)
            cues.append(Cue(group[0][0].start, group[-1][-1].end, text))
    return cues


def write_txt(transcript: Transcript, out: TextIO, audio: str = "") -> None:
    for segment in transcript.segments:
        out.write(segment.text + "\n")


def write_srt(transcript: Transcript, out: TextIO, audio: str = "") -> None:
    for i, cue in enumerate(caption_cues(transcript), start=1):
        out.write(f"{i}\n{format_timestamp(cue.start, ',')} --> {format_timestamp(cue.end, ',')}\n")
        out.write("\n".join(cue.lines) + "\n\n")


def write_vtt(transcript: Transcript, out: TextIO, audio: str = "") -> None:
    out.write("WEBVTT\n\n")
    for cue in caption_cues(transcript):
        out.write(f"{format_timestamp(cue.start, '.')} --> {format_timestamp(cue.end, '.')}\n")
        out.write("\n".join(cue.lines) + "\n\n")


def transcript_to_json(transcript: Transcript, audio: str) -> dict:
    return {
        "audio": audio,
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
        "segments": [asdict(s) for s in transcript.segments],
    }


def write_json(transcript: Transcript, out: TextIO, audio: str = "") -> None:
    json.dump(transcript_to_json(transcript, audio), out, ensure_ascii=False, indent=2)
    out.write("\n")


WRITERS = {"txt": write_txt, "srt": write_srt, "vtt": write_vtt, "json": write_json}
FORMATS = tuple(WRITERS)


def write_outputs(transcript: Transcript, audio_path: Path, output_dir: Path, formats: Iterable[str]) -> list[Path]:
    """Write `<output_dir>/<audio stem>.<fmt>` for each format; returns the paths written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = output_dir / f"{audio_path.stem}.{fmt}"
        with path.open("w", encoding="utf-8") as out:
            WRITERS[fmt](transcript, out, str(audio_path))
        written.append(path)
    return written
