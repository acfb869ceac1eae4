import io
import json
import random

from asr.decoding import Segment, Transcript, Word
from asr.writers import MAX_LINE_CHARS, caption_cues, format_timestamp, write_json, write_srt, write_txt, write_vtt
from tests.captions import parse_srt, parse_vtt


def _transcript(seed: int = 0) -> Transcript:
    rng = random.Random(seed)
    segments, t = [], 0.0
    for seg_id in range(6):
        words = []
        for _ in range(rng.randint(1, 25)):
            w = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ'") for _ in range(rng.randint(1, 12)))
            words.append(Word(w, round(t, 3), round(t + 0.3, 3), 0.8))
            t += 0.4
        segments.append(Segment(seg_id, words[0].start, words[-1].end, " ".join(w.word for w in words), tuple(words)))
        t += 2.0
    return Transcript(tuple(segments), duration=t + 1)


def _render(writer, transcript: Transcript) -> str:
    out = io.StringIO()
    writer(transcript, out)
    return out.getvalue()


def test_timestamps() -> None:
    assert format_timestamp(0, ",") == "00:00:00,000"
    assert format_timestamp(3725.0456, ".") == "01:02:05.046"
    assert format_timestamp(36000.9999, ",") == "10:00:01,000"


def test_srt_and_vtt_follow_the_specs() -> None:
    transcript = _transcript()
    srt, vtt = parse_srt(_render(write_srt, transcript)), parse_vtt(_render(write_vtt, transcript))
    assert srt == vtt and len(srt) >= len(transcript.segments)
    for _, _, lines in srt:
        assert all(len(line) <= MAX_LINE_CHARS for line in lines)
    assert " ".join(" ".join(lines) for _, _, lines in srt) == transcript.text
    assert srt[0][0] == transcript.segments[0].start and srt[-1][1] == transcript.segments[-1].end


def test_cues_never_cross_segments() -> None:
    transcript = _transcript(1)
    bounds = [(s.start, s.end) for s in transcript.segments]
    for cue in caption_cues(transcript):
        assert any(start <= cue.start and cue.end <= end for start, end in bounds)


def test_overlong_word_gets_its_own_line() -> None:
    long = Word("A" * 50, 0.0, 1.0, 0.5)
    short = Word("B", 1.0, 1.2, 0.5)
    t = Transcript((Segment(0, 0.0, 1.2, f"{long.word} B", (long, short)),), 2.0)
    assert caption_cues(t)[0].lines == ("A" * 50, "B")


def test_txt_and_json() -> None:
    transcript = _transcript(2)
    assert _render(write_txt, transcript).splitlines() == [s.text for s in transcript.segments]
    data = json.loads(_render(write_json, transcript))
    assert data["text"] == transcript.text and data["duration"] == round(transcript.duration, 3)
    assert [s["id"] for s in data["segments"]] == list(range(6))
    word = data["segments"][0]["words"][0]
    assert set(word) == {"word", "start", "end", "conf"} and isinstance(word["conf"], float)


def test_empty_transcript() -> None:
    empty = Transcript((), 1.0)
    assert parse_srt(_render(write_srt, empty)) == [] and parse_vtt(_render(write_vtt, empty)) == []
