"""The streaming engine's batcher work per audio chunk, without the network: N streams each send 100 ms of
audio per tick for `--ticks` ticks, straight into `Engine._process` (resampling, framing, batched log-mel, the
batched model step, decoding, partials), timed and profiled with cProfile.

`--no-model` swaps the model out for a stand-in that returns zero features and blank-only log-probs at once: what
is left is the per-stream work a server worker does when the model runs elsewhere (`--step-process`).

    python bench/engine_tick.py --model DIR [--streams 64] [--ticks 50] [--device cpu] [--no-model]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from pathlib import Path

import numpy as np
import torch

from asr.checkpoint import DTYPES, load_model
from asr.features import N_MELS, SUBSAMPLING
from streaming.engine import Command, Engine
from streaming.protocol import StreamOptions

CHUNK_SAMPLES = 1600  # 100 ms at 16 kHz


class NoModel:
    """A stand-in for the model compute: zero features, log-probs with blank (token 0) certain."""

    device = torch.device("cpu")

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def features(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(windows.shape[0], N_MELS)

    def step(self, feats: torch.Tensor, slots: list[int]) -> torch.Tensor:
        out = torch.full((feats.shape[0], feats.shape[1] // SUBSAMPLING, self.vocab), -30.0)
        out[..., 0] = 0.0
        return out

    def reset(self, slots: list[int]) -> None:
        pass


async def run(model_dir: Path, streams: int, ticks: int, device: torch.device, dtype: str, no_model: bool) -> None:
    model, _ = load_model(model_dir, device=device, dtype=DTYPES[dtype])
    engine = Engine(model, device, streams, compute=NoModel(model.dims.vocab_size) if no_model else None)
    loop = asyncio.get_running_loop()
    opened = [engine.open(16000, StreamOptions(partial_interval_s=0.04), lambda *_: None) for _ in range(streams)]
    engine._process([engine.queue.get_nowait() for _ in range(engine.queue.qsize())], loop)  # the resets
    chunk = (np.random.default_rng(0).standard_normal(CHUNK_SAMPLES) * 0.1).astype(np.float32)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(ticks):
        engine._process([Command(s, "audio", audio=chunk) for s in opened], loop)
    profiler.disable()
    elapsed = time.perf_counter() - start
    per_chunk = elapsed / ticks / streams * 1e6
    print(f"{streams} streams x {ticks} ticks of 100 ms: {elapsed:.2f} s, {per_chunk:.0f} us per stream-chunk")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model directory (e.g. from `asr init-model`)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--ticks", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="as `asr serve --dtype`")
    p.add_argument("--no-model", action="store_true", help="time everything but the model (see above)")
    args = p.parse_args()
    torch.set_num_threads(1)
    asyncio.run(run(args.model, args.streams, args.ticks, torch.device(args.device), args.dtype, args.no_model))


if __name__ == "__main__":
    main()
