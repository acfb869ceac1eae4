"""`asr stream FILE`: stream a file through the native protocol and show live captions.

Partials overwrite one line; each final is printed on its own line. `--realtime` paces the audio
like a microphone; `--fast` (default) sends as fast as the server accepts it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import connect

from asr.audio import stream_audio
from asr.features import SAMPLE_RATE
from streaming import protocol as P

CHUNK_S = 0.1


@dataclass(frozen=True)
class StreamResult:
    finals: list[dict]  # the server's final messages, in order

    @property
    def text(self) -> str:
        return " ".join(f["text"] for f in self.finals if f["text"])


async def _send(ws, path: Path, realtime: bool) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0.0
    for chunk in stream_audio(path, block_s=CHUNK_S):
        await ws.send(P.encode_audio(chunk.numpy(), "pcm_s16le"))
        sent += chunk.numel() / SAMPLE_RATE
        if realtime:
            await asyncio.sleep(max(0.0, start + sent - loop.time()))  # pace like a live microphone
    await ws.send(P.close_message())


def show(message: dict, out) -> None:
    """Print a server message: partials overwrite the current line, finals get their own."""
    if message["type"] == "partial":
        out.write(f"\r\033[K{message['text']}")
    elif message["type"] == "final":
        out.write(f"\r\033[K[{message['start']:7.2f} - {message['end']:7.2f}] {message['text']}\n")
    elif message["type"] == "error":
        out.write(f"\r\033[Kserver error {message['code']}: {message['message']}\n")
    out.flush()


def open_stream(url: str, token: str | None):
    """A native-protocol connection for 16 kHz pcm_s16le audio (an async context manager)."""
    params = P.StreamParams(SAMPLE_RATE, "pcm_s16le", token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return connect(P.stream_url(url, params), additional_headers=headers, max_size=None)


async def stream_file(url: str, path: Path, realtime: bool = False, token: str | None = None, out=None) -> StreamResult:
    """Send `path` (any format, resampled to 16 kHz s16le) and collect the finals until the server closes."""
    finals: list[dict] = []
    async with open_stream(url, token) as ws:
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise ConnectionError(f"expected ready, got {ready}")
        sender = asyncio.create_task(_send(ws, path, realtime))
        async for raw in ws:
            message = json.loads(raw)
            if out is not None:
                show(message, out)
            if message["type"] == "final":
                finals.append(message)
        await sender
    return StreamResult(finals)


def main(url: str, path: Path, realtime: bool, token: str | None) -> int:
    result = asyncio.run(stream_file(url, path, realtime, token, out=sys.stdout))
    print(f"\n{len(result.finals)} segments", file=sys.stderr)
    return 0
