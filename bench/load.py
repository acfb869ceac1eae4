"""Load benchmark: N concurrent real-time streams against an `asr serve` on loopback.

Each client streams a synthesized utterance (espeak-ng) at real-time pace in 100 ms chunks,
then closes. Reported per N:
- partial latency: arrival of a partial minus the send time of the chunk holding the audio its
  `end` points at (so it includes the 40 ms frame and batching). Clients ask for partials every
  40 ms (`partial_interval_s`), so the default 250 ms throttle does not dominate the figure;
- final latency: arrival of a final minus the send time of the chunk holding its `end` (it
  includes the endpoint pause, `pause_s` = 0.8 s by default, by design);
- server CPU (cores busy) and RSS, from /proc; whether every transcript equals the offline one.

    python bench/load.py --streams 1 4 8 16 [--model DIR] [--device cpu]
    python bench/load.py --streams 8 --soak-minutes 30     # constant load; RSS after warm-up vs end
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from websockets.asyncio.client import connect

from asr import DEFAULT_MODEL_DIR
from asr.checkpoint import load_model
from asr.transcribe import transcribe_file
from streaming import protocol as P

ROOT = Path(__file__).resolve().parents[1]
CHUNK_S = 0.1
SENTENCES = [
    "the quick brown fox jumps over the lazy dog and runs into the forest",
    "a streaming recognizer keeps a fixed state for every stream it serves",
    "she sells sea shells by the sea shore while the children play in the sand",
    "it was the best of times it was the worst of times said the old man",
]


@dataclass
class StreamStats:
    partial_latency: list[float] = field(default_factory=list)
    final_latency: list[float] = field(default_factory=list)
    text: str = ""


def make_clips(folder: Path) -> list[Path]:
    clips = []
    for i, text in enumerate(SENTENCES):
        raw, path = folder / f"raw{i}.wav", folder / f"clip{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True)
        audio, rate = sf.read(raw, dtype="float32")
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, 16000).numpy()
        sf.write(path, np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(16000, np.float32)]), 16000)
        clips.append(path)
    return clips


async def one_stream(url: str, clip: np.ndarray, stats: StreamStats, start_delay: float) -> None:
    await asyncio.sleep(start_delay)  # stagger the streams
    sent_at: list[float] = []
    step = int(16000 * CHUNK_S)
    async with connect(f"{url}{P.STREAM_PATH}?sample_rate=16000&encoding=f32le", max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "config", "partial_interval_s": 0.04}))

        async def send() -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for k, i in enumerate(range(0, len(clip), step)):
                await asyncio.sleep(max(0.0, start + k * CHUNK_S - loop.time()))  # real-time pace
                sent_at.append(time.monotonic())
                await ws.send(P.encode_audio(clip[i : i + step], "f32le"))
            await ws.send(json.dumps({"type": "close"}))

        sender = asyncio.create_task(send())
        finals = []
        async for raw in ws:
            now, m = time.monotonic(), json.loads(raw)
            if m["type"] not in ("partial", "final") or not m["text"]:
                continue
            chunk = min(int(m["end"] / CHUNK_S), len(sent_at) - 1)
            (stats.partial_latency if m["type"] == "partial" else stats.final_latency).append(now - sent_at[chunk])
            if m["type"] == "final":
                finals.append(m["text"])
        await sender
        stats.text = " ".join(finals)


def proc_sample(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, RSS MiB) of a process, from /proc."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    rss = (
        next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS")
        )
        / 1024
    )
    return cpu, rss


async def run_load(url: str, clips: list[np.ndarray], n: int) -> list[StreamStats]:
    stats = [StreamStats() for _ in range(n)]
    await asyncio.gather(*(one_stream(url, clips[i % len(clips)], stats[i], i * CHUNK_S / max(1, n)) for i in range(n)))
    return stats


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def start_server(model: Path, device: str, slots: int) -> tuple[subprocess.Popen, str]:
    serve = ["serve", "--model", str(model), "--port", "0", "--device", device, "--max-streams", str(slots)]
    cmd = [sys.executable, "-m", "asr", *serve]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line.split()[2].removesuffix("/v1/stream")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--device", default="cpu")
    p.add_argument("--soak-minutes", type=float, default=0.0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_clips(Path(tmp))
        model, _ = load_model(args.model, device=args.device)  # the reference runs on the server's device
        expected = [transcribe_file(c, model, device=args.device).text for c in paths]
        clips = [sf.read(c, dtype="float32")[0] for c in paths]
    proc, url = start_server(args.model, args.device, max(args.streams))
    rows = []
    try:
        asyncio.run(run_load(url, clips, 1))  # warm-up: kernel compilation and first allocations
        for n in args.streams:
            cpu0, _ = proc_sample(proc.pid)
            t0 = time.monotonic()
            stats = asyncio.run(run_load(url, clips, n))
            cpu1, rss = proc_sample(proc.pid)
            busy = (cpu1 - cpu0) / (time.monotonic() - t0)
            partial = [x for s in stats for x in s.partial_latency]
            final = [x for s in stats for x in s.final_latency]
            exact = sum(s.text == expected[i % len(expected)] for i, s in enumerate(stats))
            for i, s in enumerate(stats):
                if s.text != expected[i % len(expected)]:
                    print(f"  stream {i} differs:\n    offline {expected[i % len(expected)]!r}\n    served  {s.text!r}")
            rows.append(
                (
                    n,
                    pct(partial, 50),
                    pct(partial, 95),
                    pct(partial, 99),
                    pct(final, 50),
                    pct(final, 99),
                    busy,
                    rss,
                    exact,
                )
            )
            print(
                f"N={n}: partial p99 {rows[-1][3]:.0f} ms, final p99 {rows[-1][5]:.0f} ms, cpu {busy:.2f}, "
                f"exact {exact}/{n}",
                flush=True,
            )
        if args.soak_minutes:
            soak(url, clips, args.streams[-1], args.soak_minutes, proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        "\n| streams | partial p50 | p95 | p99 | final p50 | p99 | server CPU (cores) | RSS | transcripts = offline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, p50, p95, p99, f50, f99, busy, rss, exact in rows:
        print(
            f"| {n} | {p50:.0f} ms | {p95:.0f} ms | {p99:.0f} ms | {f50:.0f} ms | {f99:.0f} ms | {busy:.2f} | "
            f"{rss:.0f} MiB | {exact}/{n} |"
        )


def soak(url: str, clips: list[np.ndarray], n: int, minutes: float, pid: int) -> None:
    """Constant load for `minutes`: streams restart as they finish. RSS after warm-up vs at the end."""
    end = time.monotonic() + minutes * 60
    warm_rss, rounds = None, 0
    while time.monotonic() < end:
        asyncio.run(run_load(url, clips, n))
        rounds += 1
        _, rss = proc_sample(pid)
        if warm_rss is None:
            warm_rss = rss
    _, final_rss = proc_sample(pid)
    print(
        f"soak: {minutes:g} min, {n} streams, {rounds} rounds; RSS after warm-up {warm_rss:.0f} MiB, "
        f"at the end {final_rss:.0f} MiB ({final_rss / warm_rss - 1:+.1%}; target within 5 %)",
        flush=True,
    )


if __name__ == "__main__":
    main()
