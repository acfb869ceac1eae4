"""Parsers that check SRT and WebVTT structure strictly (used by several tests)."""

from __future__ import annotations

import re

SRT_TIME = r"(\d{2}):(\d{2}):(\d{2}),(\d{3})"
VTT_TIME = r"(\d{2}):(\d{2}):(\d{2})\.(\d{3})"


def _seconds(groups: tuple[str, ...]) -> float:
    h, m, s, ms = (int(g) for g in groups)
    assert m < 60 and s < 60
    return h * 3600 + m * 60 + s + ms / 1000


def _cues(blocks: list[str], time_re: str, numbered: bool) -> list[tuple[float, float, list[str]]]:
    cues, last_end = [], 0.0
    for i, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        if numbered:
            assert lines.pop(0) == str(i), f"cue {i} is not numbered {i}"
        m = re.fullmatch(f"{time_re} --> {time_re}", lines[0])
        assert m, f"bad timing line {lines[0]!r}"
        start, end = _seconds(m.groups()[:4]), _seconds(m.groups()[4:])
        assert last_end <= start < end, f"cue {i} times out of order: {start} -> {end}"
        text = lines[1:]
        assert 1 <= len(text) <= 2 and all(t.strip() for t in text)
        cues.append((start, end, text))
        last_end = end
    return cues


def parse_srt(content: str) -> list[tuple[float, float, list[str]]]:
    assert content.endswith("\n\n") or content == "", "SRT must end with a blank line"
    blocks = [b for b in content.strip("\n").split("\n\n") if b]
    return _cues(blocks, SRT_TIME, numbered=True)


def parse_vtt(content: str) -> list[tuple[float, float, list[str]]]:
    assert content.startswith("WEBVTT\n\n")
    blocks = [b for b in content[len("WEBVTT\n\n") :].strip("\n").split("\n\n") if b]
    return _cues(blocks, VTT_TIME, numbered=False)
