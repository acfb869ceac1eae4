"""`asr mic`: live captions from the default microphone through the native protocol."""

from __future__ import annotations

import asyncio
import json
import sys

from asr.features import SAMPLE_RATE
from clients.stream import open_stream, show

RATE = SAMPLE_RATE
BLOCK_S = 0.1


class MicrophoneError(Exception):
    """No usable input device (or no PortAudio library)."""


def open_microphone(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """An input stream whose 100 ms int16 blocks land in `queue`. Raises MicrophoneError."""
    try:
        import sounddevice as sd  # needs the PortAudio library (apt: libportaudio2)
    except OSError as e:
        raise MicrophoneError(f"cannot load PortAudio ({e}); install the apt package libportaudio2") from e
    try:
        sd.query_devices(kind="input")
    except sd.PortAudioError as e:
        raise MicrophoneError(
            f"no audio input device found ({e}); plug in a microphone or use `asr stream FILE`"
        ) from e

    def callback(data, frames, time, status) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, bytes(data))

    return sd.RawInputStream(
        samplerate=RATE, channels=1, dtype="int16", blocksize=int(RATE * BLOCK_S), callback=callback
    )


async def _send(ws, queue: asyncio.Queue) -> None:
    while True:
        await ws.send(await queue.get())


async def run(url: str, token: str | None) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    mic = open_microphone(loop, queue)
    async with open_stream(url, token) as ws:
        json.loads(await ws.recv())
        print("listening... (Ctrl-C to stop)", file=sys.stderr)
        with mic:
            sender = asyncio.create_task(_send(ws, queue))
            try:
                async for raw in ws:
                    show(json.loads(raw), sys.stdout)
            finally:
                sender.cancel()


def main(url: str, token: str | None) -> int:
    try:
        asyncio.run(run(url, token))
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    return 0
