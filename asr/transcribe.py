"""File transcription through the streaming path: memory stays flat however long the audio."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from asr.audio import audio_info, stream_audio
from asr.decoding import GreedyCTCDecoder, Rescorer, Segment, SegmenterConfig, Transcript
from asr.features import SAMPLE_RATE
from asr.recognizer import StreamingModel, StreamRecognizer
from asr.text import VOCAB


def transcribe_file(
    path: str | Path,
    model: StreamingModel,
    vocab: tuple[str, ...] = VOCAB,
    device: torch.device | str = "cpu",
    chunk_ms: int = 1000,
    segmenter: SegmenterConfig | None = None,
    progress: bool = False,
    on_segment: Callable[[Segment], None] | None = None,
    rescorer: Rescorer | None = None,
) -> Transcript:
    """Stream `path` through `model` (an `ASRModel` or an exported `OnnxModel`) in chunks of `chunk_ms` of audio.
    Raises AudioError.

    `on_segment` is called with each caption segment as soon as it is final. A `rescorer`
    (`asr.lm.SegmentRescorer`) decodes each segment again with a language model.
    """
    info = audio_info(path)
    recognizer = StreamRecognizer(model, device)
    decoder = GreedyCTCDecoder(vocab, segmenter, rescorer=rescorer)
    segments: list[Segment] = []
    with tqdm(
        total=round(info.duration, 2), unit="s", unit_scale=True, desc=info.path.name, disable=not progress, leave=False
    ) as bar:
        for audio in stream_audio(info.path, block_s=chunk_ms / 1000):
            segments += _report(decoder.feed(recognizer.accept(audio)), on_segment)
            bar.update(round(audio.numel() / SAMPLE_RATE, 2))
        segments += _report(decoder.feed(recognizer.finish()) + decoder.flush(), on_segment)
    return Transcript(tuple(segments), duration=info.duration)


def _report(segments: list[Segment], on_segment: Callable[[Segment], None] | None) -> list[Segment]:
    if on_segment is not None:
        for segment in segments:
            on_segment(segment)
    return segments
