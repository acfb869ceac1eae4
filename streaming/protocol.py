"""The wire protocol, defined once: the server and every client import it. See docs/protocol.md.

Native endpoint `ws://HOST:PORT/v1/stream?sample_rate=16000&encoding=pcm_s16le[&token=T][&resume_token=R]`:
client -> server: binary audio frames of any size, and JSON text messages
    {"type": "flush"} | {"type": "close"} | {"type": "config", ...StreamOptions fields}
server -> client: JSON text messages
    {"type": "ready", ...} | {"type": "partial", ...} | {"type": "final", ...} | {"type": "error", ...}

Vosk-compatible endpoint `/vosk`: the Vosk server protocol (int16 frames, one reply per frame).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from asr.decoding import Segment, SegmenterConfig

STREAM_PATH = "/v1/stream"
VOSK_PATH = "/vosk"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"

ENCODINGS = ("pcm_s16le", "f32le")
MIN_RATE, MAX_RATE = 8_000, 48_000
VOSK_DEFAULT_RATE = 8_000  # Vosk assumes 8 kHz until a config message says otherwise

# Close codes (RFC 6455 and the 4000-4999 private range).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_IDLE = 4000
CLOSE_TOO_FAST = 4001
CLOSE_BAD_RESUME = 4002

# Error codes in {"type": "error", "code": ...}.
ERR_BAD_JSON = "bad_json"
ERR_UNKNOWN_TYPE = "unknown_type"
ERR_BAD_CONFIG = "bad_config"
ERR_BAD_AUDIO = "bad_audio"
ERR_TOO_FAST = "too_fast"
ERR_IDLE = "idle_timeout"
ERR_BAD_RESUME = "bad_resume_token"
ERR_INTERNAL = "internal"


class ProtocolError(Exception):
    """A message or request that breaks the protocol: `code` for the client, `message` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------- connecting


@dataclass(frozen=True)
class StreamParams:
    sample_rate: int = 16_000
    encoding: str = "pcm_s16le"
    token: str | None = None
    resume_token: str | None = None


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def parse_stream_url(path: str) -> StreamParams:
    """The query of a native-endpoint URL; raises ProtocolError with the reason it is refused."""
    query = parse_qs(urlsplit(path).query)
    rate_text = _one(query, "sample_rate") or "16000"
    encoding = _one(query, "encoding") or "pcm_s16le"
    try:
        rate = int(rate_text)
    except ValueError:
        raise ProtocolError(ERR_BAD_CONFIG, f"sample_rate must be an integer, got {rate_text!r}") from None
    check_rate(rate)
    if encoding not in ENCODINGS:
        raise ProtocolError(ERR_BAD_CONFIG, f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    return StreamParams(rate, encoding, _one(query, "token"), _one(query, "resume_token"))


def query_token(path: str) -> str | None:
    """The `token` query parameter of any endpoint URL."""
    return _one(parse_qs(urlsplit(path).query), "token")


def check_rate(rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError(ERR_BAD_CONFIG, f"sample_rate must be {MIN_RATE}-{MAX_RATE} Hz, got {rate}")


def stream_url(base: str, params: StreamParams) -> str:
    """`base` (ws://host:port) -> the native endpoint URL with `params` in the query."""
    query = f"sample_rate={params.sample_rate}&encoding={params.encoding}"
    if params.token:
        query += f"&token={params.token}"
    if params.resume_token:
        query += f"&resume_token={params.resume_token}"
    return f"{base.rstrip('/')}{STREAM_PATH}?{query}"


# ---------------------------------------------------------------- audio


def decode_audio(data: bytes, encoding: str) -> np.ndarray:
    """A binary frame -> float32 samples in [-1, 1]. Raises ProtocolError for a frame that cannot be audio."""
    if encoding == "pcm_s16le":
        if len(data) % 2:
            raise ProtocolError(ERR_BAD_AUDIO, f"pcm_s16le frames need an even byte count, got {len(data)}")
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if len(data) % 4:
        raise ProtocolError(ERR_BAD_AUDIO, f"f32le frames need a multiple of 4 bytes, got {len(data)}")
    samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(samples).all():
        raise ProtocolError(ERR_BAD_AUDIO, "f32le frame holds NaN or Inf samples")
    return samples


def encode_audio(samples: np.ndarray, encoding: str) -> bytes:
    """float32 samples -> a binary frame (for clients)."""
    if encoding == "pcm_s16le":
        return (np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes()
    return samples.astype("<f4").tobytes()


# ---------------------------------------------------------------- client messages


@dataclass(frozen=True)
class StreamOptions:
    """Per-stream options, set by {"type": "config", ...}; every field is optional in the message."""

    pause_s: float = SegmenterConfig.pause_s  # a pause (run of blanks) this long ends a segment: the endpoint
    max_segment_s: float = SegmenterConfig.max_segment_s  # a segment this long ends at the next word boundary
    partial_interval_s: float = 0.25  # partials at most this often (stream audio time)

    def updated(self, changes: dict[str, Any]) -> StreamOptions:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ProtocolError(ERR_BAD_CONFIG, f"unknown config keys {unknown}; known: {sorted(known)}")
        values = asdict(self)
        for key, value in changes.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ProtocolError(ERR_BAD_CONFIG, f"{key} must be a positive number, got {value!r}")
            values[key] = float(value)
        return StreamOptions(**values)


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Configure:
    changes: dict[str, Any] = field(default_factory=dict)


ClientMessage = Flush | Close | Configure


def _json_object(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(ERR_BAD_JSON, f"not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ERR_BAD_JSON, "a message must be a JSON object")
    return message


def close_message() -> str:
    """The client's `{"type": "close"}`: finalize everything and close."""
    return json.dumps({"type": "close"})


def parse_client_message(text: str) -> ClientMessage:
    message = _json_object(text)
    kind = message.pop("type", None)
    if kind == "flush":
        return Flush()
    if kind == "close":
        return Close()
    if kind == "config":
        return Configure(message)
    raise ProtocolError(ERR_UNKNOWN_TYPE, f"unknown message type {kind!r} (flush, close or config)")


# ---------------------------------------------------------------- server messages


def ready(session: str, resume_token: str, model: dict[str, Any], sample_rate: int) -> str:
    return json.dumps(
        {"type": "ready", "session": session, "resume_token": resume_token, "model": model, "sample_rate": sample_rate}
    )


def partial(segment: Segment) -> str:
    return json.dumps(
        {"type": "partial", "segment": segment.id, "text": segment.text, "start": segment.start, "end": segment.end}
    )


def final(segment: Segment) -> str:
    words = [{"word": w.word, "start": w.start, "end": w.end, "conf": w.conf} for w in segment.words]
    return json.dumps(
        {
            "type": "final",
            "segment": segment.id,
            "text": segment.text,
            "start": segment.start,
            "end": segment.end,
            "words": words,
        }
    )


def error(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message})


# ---------------------------------------------------------------- Vosk


@dataclass(frozen=True)
class VoskConfig:
    sample_rate: int


@dataclass(frozen=True)
class VoskEof:
    pass


@dataclass(frozen=True)
class VoskReset:
    pass


VoskMessage = VoskConfig | VoskEof | VoskReset


def parse_vosk_message(text: str) -> VoskMessage:
    """`{"config": {"sample_rate": R}}`, `{"eof" : 1}` or `{"reset" : 1}` (spacing does not matter)."""
    message = _json_object(text)
    if "eof" in message:
        return VoskEof()
    if "reset" in message:
        return VoskReset()
    config = message.get("config")
    if isinstance(config, dict):
        rate = config.get("sample_rate", VOSK_DEFAULT_RATE)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate != int(rate):
            raise ProtocolError(ERR_BAD_CONFIG, f"sample_rate must be an integer, got {rate!r}")
        check_rate(int(rate))
        return VoskConfig(int(rate))
    raise ProtocolError(ERR_UNKNOWN_TYPE, "expected config, eof or reset")


def vosk_eof() -> str:
    """The Vosk client's end of stream."""
    return '{"eof" : 1}'


def vosk_partial(text: str) -> str:
    """Vosk replies carry lower-case text, as Vosk models produce."""
    return json.dumps({"partial": text.lower()})


def vosk_result(segments: list[Segment]) -> str:
    words = [
        {"word": w.word.lower(), "start": w.start, "end": w.end, "conf": w.conf} for s in segments for w in s.words
    ]
    return json.dumps({"result": words, "text": " ".join(s.text for s in segments).lower()})
