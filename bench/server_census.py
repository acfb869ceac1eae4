"""Does the server keep anything per stream once it has closed? An in-process object census.

Runs an `ASRServer` on this process's CPU, streams rounds of N streams through it (3 s of noise
each, then a close), and counts live Python objects by type (gc) after the first rounds and at the
end, so growth that a soak shows in RSS can be told apart from objects left behind.

    python bench/server_census.py --model DIR [--streams 8] [--rounds 10 40]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from websockets.sync.client import connect

from asr.checkpoint import load_model
from streaming import protocol as P
from streaming.server import ASRServer, ServerConfig


def start(server: ASRServer) -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    started.wait()
    return loop


def census() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--rounds", type=int, nargs=2, default=[10, 40], help="rounds before the first census, then between")
    args = p.parse_args()
    model, _ = load_model(args.model)
    server = ASRServer(model, torch.device("cpu"), ServerConfig(port=0, max_streams=args.streams), {})
    start(server)
    url = f"ws://127.0.0.1:{server.port}{P.STREAM_PATH}?sample_rate=16000&encoding=f32le"
    audio = np.random.default_rng(0).normal(0, 0.1, 16000 * 3).astype(np.float32)

    def one(_: int) -> None:
        with connect(url) as ws:
            ws.recv()
            for i in range(0, len(audio), 1600):
                ws.send(P.encode_audio(audio[i : i + 1600], "f32le"))
            ws.send(P.close_message())
            list(ws)

    with ThreadPoolExecutor(args.streams) as pool:
        for _ in range(args.rounds[0]):
            list(pool.map(one, range(args.streams)))
        before = census()
        for _ in range(args.rounds[1]):
            list(pool.map(one, range(args.streams)))
        after = census()
    grown = sorted(((k, after[k] - before[k]) for k in after if after[k] - before[k] > 20), key=lambda kv: -kv[1])
    print(f"{args.rounds[1] * args.streams} streams between the two counts; types grown by more than 20: {grown}")
    print(
        f"left in the server: sessions {len(server.sessions)}, slots held {server.engine.active}, "
        f"handshake reservations {len(server._reserved)}, handlers {len(server.handlers)}, "
        f"commands queued {server.engine.queue.qsize()}"
    )


if __name__ == "__main__":
    main()
