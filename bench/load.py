"""Load benchmark: N concurrent real-time streams against an `asr serve` on loopback.

Each client streams a synthesized utterance (espeak-ng) at real-time pace in `--chunk-ms` chunks (100 ms),
then closes. Stream starts are spread evenly over one chunk period. The N streams are spread over
`--client-procs` processes, each with its own event loop, so the clients do not become the bottleneck
(stream i runs in process i mod K). Reported per N:
- partial latency: arrival of a partial minus the send time of the chunk holding the audio its
  `end` points at (so it includes the 40 ms frame and batching). Clients ask for partials every
  40 ms (`partial_interval_s`), so the default 250 ms throttle does not dominate the figure;
- final latency: arrival of a final minus the send time of the chunk holding its `end` (it
  includes the endpoint pause, `pause_s` = 0.8 s by default, by design);
- server CPU (cores busy) and RSS, from /proc, summed over its worker processes; whether every
  transcript equals the offline one (`asr transcribe` in the same `--dtype`; in bfloat16 the two agree only within
  its rounding, so a transcript can differ without anything being wrong);
- on CUDA: mean GPU utilisation and the most GPU memory used (nvidia-smi, whole GPU, sampled every 0.5 s).
Latencies use time.monotonic(), which all processes share.

    python bench/load.py --streams 1 4 8 16 [--model DIR] [--device cpu] [--dtype float32|bfloat16]
    python bench/load.py --streams 8 --soak-minutes 30     # constant load: RSS (and GPU memory), warmed up vs end
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO

import numpy as np
import soundfile as sf
import torch
import torchaudio
from websockets.asyncio.client import ClientConnection, connect

from asr import DEFAULT_MODEL_DIR
from asr.checkpoint import DTYPES, load_model
from asr.lm import BeamSearch, SegmentRescorer, find_lm
from asr.transcribe import transcribe_file
from streaming import protocol as P

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
START_DELAY_S = 0.2  # from handing out a round to its first stream start: every client process has its job
GPU_PERIOD_S = 0.5
MAX_DIFFS_SHOWN = 5
SERVER_LOG_LINES = 20
SENTENCES = [
    "the quick brown fox jumps over the lazy dog and runs into the forest",
    "a streaming recognizer keeps a fixed state for every stream it serves",
    "she sells sea shells by the sea shore while the children play in the sand",
    "it was the best of times it was the worst of times said the old man",
]


@dataclass
class StreamStats:
    index: int  # the stream's number in its round, 0..N-1
    partial_latency: list[float] = field(default_factory=list)
    final_latency: list[float] = field(default_factory=list)
    finals: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.finals)


@dataclass(frozen=True)
class Round:
    """One client process's share of a round of `streams` streams."""

    url: str
    streams: int  # N, over all processes: the stagger spreads N starts over one chunk
    indices: range  # the streams this process runs
    start: float  # time.monotonic() at which stream 0 starts
    chunk_ms: int

    @property
    def chunk_s(self) -> float:
        return self.chunk_ms / 1000


@dataclass(frozen=True)
class Row:
    streams: int
    partial_p50: float
    partial_p95: float
    partial_p99: float
    final_p50: float
    final_p99: float
    cpu_cores: float
    rss_mib: float
    gpu_util: float | None  # mean %, None without a GPU to watch
    gpu_mem_mib: float | None  # max
    exact: int
    client_cores: float  # CPU of the busiest client process: near 1.0, the clients may be what is slow


@dataclass(frozen=True)
class GpuSample:
    util: float  # %
    mem_mib: float


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    stderr: IO[bytes]


def make_clips(folder: Path) -> list[Path]:
    clips = []
    for i, text in enumerate(SENTENCES):
        raw, path = folder / f"raw{i}.wav", folder / f"clip{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True)
        audio, rate = sf.read(raw, dtype="float32")
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()
        silence = [np.zeros(SAMPLE_RATE // 2, np.float32), audio, np.zeros(SAMPLE_RATE, np.float32)]
        sf.write(path, np.concatenate(silence), SAMPLE_RATE)
        clips.append(path)
    return clips


def offline_transcripts(paths: list[Path], model_dir: Path, device: str, dtype: str, lm: bool) -> list[str]:
    model, _ = load_model(model_dir, device=device, dtype=DTYPES[dtype])  # the reference runs as the server does
    lm_dir = find_lm(model_dir) if lm else None
    search = BeamSearch(lm_dir) if lm_dir else None
    return [
        transcribe_file(p, model, device=device, rescorer=SegmentRescorer(search) if search else None).text
        for p in paths
    ]


def reference_transcripts(paths: list[Path], model_dir: Path, device: str, dtype: str, lm: bool) -> list[str]:
    """`asr transcribe` of each clip, in a child process: this one never holds GPU memory (nvidia-smi sees it)."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(offline_transcripts, paths, model_dir, device, dtype, lm).result()


# ---------------------------------------------------------------- client processes


async def send_clip(ws: ClientConnection, clip: np.ndarray, job: Round, sent_at: list[float]) -> None:
    step = SAMPLE_RATE * job.chunk_ms // 1000
    start = time.monotonic()
    for k, i in enumerate(range(0, len(clip), step)):
        await asyncio.sleep(max(0.0, start + k * job.chunk_s - time.monotonic()))  # real-time pace
        sent_at.append(time.monotonic())
        await ws.send(P.encode_audio(clip[i : i + step], "f32le"))
    await ws.send(P.close_message())


def record(stats: StreamStats, message: dict, now: float, sent_at: list[float], chunk_ms: int) -> None:
    """Latency of a partial or final: `now` minus the send time of the chunk holding the sample before `end`."""
    if message["type"] == "error":
        raise RuntimeError(f"stream {stats.index}: server error {message}")
    if message["type"] not in ("partial", "final") or not message["text"]:
        return
    step = SAMPLE_RATE * chunk_ms // 1000
    chunk = min(max(0, round(message["end"] * SAMPLE_RATE) - 1) // step, len(sent_at) - 1)
    latency = now - sent_at[chunk]
    if message["type"] == "partial":
        stats.partial_latency.append(latency)
    else:
        stats.final_latency.append(latency)
        stats.finals.append(message["text"])


async def one_stream(job: Round, index: int, clip: np.ndarray) -> StreamStats:
    stats = StreamStats(index)
    await asyncio.sleep(max(0.0, job.start + index * job.chunk_s / job.streams - time.monotonic()))  # stagger
    sent_at: list[float] = []
    url = f"{job.url}{P.STREAM_PATH}?sample_rate={SAMPLE_RATE}&encoding=f32le"
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # ready
        await ws.send(json.dumps({"type": "config", "partial_interval_s": 0.04}))
        sender = asyncio.create_task(send_clip(ws, clip, job, sent_at))
        async for raw in ws:
            record(stats, json.loads(raw), time.monotonic(), sent_at, job.chunk_ms)
        await sender
    return stats


async def run_round(job: Round, clips: list[np.ndarray]) -> list[StreamStats]:
    return list(await asyncio.gather(*(one_stream(job, i, clips[i % len(clips)]) for i in job.indices)))


def client_main(conn: Connection, clips: list[np.ndarray]) -> None:
    """A client process: says it is up, then runs every Round it is sent and sends back its StreamStats."""
    conn.send(None)
    while True:
        conn.send(asyncio.run(run_round(conn.recv(), clips)))


class ClientPool:
    """Spawned client processes that stay up across rounds."""

    def __init__(self, procs: int, url: str, clips: list[np.ndarray], chunk_ms: int) -> None:
        ctx = mp.get_context("spawn")
        self.url, self.chunk_ms = url, chunk_ms
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for _ in range(procs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(theirs, clips), daemon=True)
            proc.start()
            theirs.close()  # so a dead client reads as EOF here
            self.conns.append(ours)
            self.procs.append(proc)
        for conn in self.conns:
            self._recv(conn)  # every process is up before the first round's start time is set

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.join()

    def run(self, streams: int, start: float) -> list[StreamStats]:
        """A round of `streams` streams, the first starting at `start` (time.monotonic()); stats by stream."""
        k = len(self.conns)
        for i, conn in enumerate(self.conns):
            conn.send(Round(self.url, streams, range(i, streams, k), start, self.chunk_ms))
        stats = [s for conn in self.conns for s in self._recv(conn)]
        return sorted(stats, key=lambda s: s.index)

    def _recv(self, conn: Connection) -> list[StreamStats] | None:
        try:
            return conn.recv()
        except EOFError:
            raise RuntimeError("a client process died (its traceback is above)") from None


# ---------------------------------------------------------------- server and GPU


def start_server(args: argparse.Namespace) -> Server:
    serve = ["serve", "--model", str(args.model), "--port", "0", "--device", args.device, "--dtype", args.dtype]
    serve += ["--max-streams", str(args.max_streams), "--workers", str(args.workers)]
    serve += ["--lm-processes", str(args.lm_processes)] + (["--no-lm"] if args.no_lm else [])
    serve += ["--step-process" if args.step_process else "--no-step-process"]
    stderr = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "asr", *serve], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr)
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        raise SystemExit(
            f"the server did not start (exit code {proc.returncode}); its stdout {line!r}, stderr:\n{log_tail(stderr)}"
        )
    return Server(proc, line.split()[2].removesuffix(P.STREAM_PATH), stderr)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    server.proc.wait(30)
    log = log_tail(server.stderr)
    if log:
        print(f"server stderr (last {SERVER_LOG_LINES} lines):\n{log}", file=sys.stderr)
    server.stderr.close()


def log_tail(log: IO[bytes]) -> str:
    log.seek(0)
    return "".join(log.read().decode(errors="replace").splitlines(keepends=True)[-SERVER_LOG_LINES:])


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the workers of `asr serve --workers N`)."""
    children = []
    with contextlib.suppress(FileNotFoundError):  # it exited while we looked
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    return [pid] + [p for c in children for p in _process_tree(c)]


def proc_sample(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, RSS MiB) of a process and its descendants, from /proc."""
    cpu = rss = 0.0
    for p in _process_tree(pid):
        try:
            fields_ = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{p}/status").read_text().splitlines()
        except FileNotFoundError:  # it exited since the walk (an LM pool process, the spawn tracker)
            continue
        cpu += (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
        rss += next((int(line.split()[1]) for line in status if line.startswith("VmRSS")), 0) / 1024
    return cpu, rss


def gpu_to_watch(device: str) -> str | None:
    """The nvidia-smi id of the GPU the server uses, or None on the CPU or without nvidia-smi."""
    if device != "cuda":
        return None
    if shutil.which("nvidia-smi") is None:
        print("nvidia-smi not found: GPU columns will read n/a", file=sys.stderr)
        return None
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # torch's cuda:0


def gpu_query(gpu: str) -> GpuSample:
    query = ["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
    util, mem = subprocess.run(query, capture_output=True, text=True, check=True).stdout.split(",")
    return GpuSample(float(util), float(mem))


class GpuMonitor:
    """nvidia-smi samples of one GPU about every GPU_PERIOD_S, from a thread, while in the `with` block.
    With `gpu` None it samples nothing."""

    def __init__(self, gpu: str | None) -> None:
        self.gpu = gpu
        self.samples: list[GpuSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuMonitor:
        if self.gpu is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.gpu is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append(gpu_query(self.gpu))
            self._stop.wait(GPU_PERIOD_S)

    def mean_util(self) -> float | None:
        return float(np.mean([s.util for s in self.samples])) if self.samples else None

    def max_mem(self) -> float | None:
        return max(s.mem_mib for s in self.samples) if self.samples else None


# ---------------------------------------------------------------- measuring


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def equals_offline(s: StreamStats, expected: list[str]) -> bool:
    return s.text == expected[s.index % len(expected)]


def show_differences(stats: list[StreamStats], expected: list[str]) -> int:
    """Print the first MAX_DIFFS_SHOWN streams whose transcript differs from the offline one; return how many match."""
    differ = [s for s in stats if not equals_offline(s, expected)]
    for s in differ[:MAX_DIFFS_SHOWN]:
        print(f"  stream {s.index} differs:\n    offline {expected[s.index % len(expected)]!r}\n    served  {s.text!r}")
    if len(differ) > MAX_DIFFS_SHOWN:
        print(f"  ... and {len(differ) - MAX_DIFFS_SHOWN} more streams differ")
    return len(stats) - len(differ)


def measure(pool: ClientPool, pid: int, streams: int, expected: list[str], gpu: str | None) -> Row:
    start = time.monotonic() + START_DELAY_S
    cpu0, _ = proc_sample(pid)
    clients0 = [proc_sample(p.pid)[0] for p in pool.procs]
    with GpuMonitor(gpu) as monitor:
        stats = pool.run(streams, start)
    cpu1, rss = proc_sample(pid)
    elapsed = time.monotonic() - start
    busy = (cpu1 - cpu0) / elapsed
    client_busy = max(proc_sample(p.pid)[0] - c0 for p, c0 in zip(pool.procs, clients0, strict=True)) / elapsed
    partial = [x for s in stats for x in s.partial_latency]
    final = [x for s in stats for x in s.final_latency]
    exact = show_differences(stats, expected)
    return Row(
        streams,
        pct(partial, 50),
        pct(partial, 95),
        pct(partial, 99),
        pct(final, 50),
        pct(final, 99),
        busy,
        rss,
        monitor.mean_util(),
        monitor.max_mem(),
        exact,
        client_busy,
    )


def or_na(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.0f}{unit}"


def print_table(rows: list[Row]) -> None:
    print(
        "\n| streams | partial p50 | p95 | p99 | final p50 | p99 | server CPU (cores) | RSS | GPU util | GPU mem "
        "| transcripts = offline | busiest client process (cores) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.streams} | {r.partial_p50:.0f} ms | {r.partial_p95:.0f} ms | {r.partial_p99:.0f} ms | "
            f"{r.final_p50:.0f} ms | {r.final_p99:.0f} ms | {r.cpu_cores:.2f} | {r.rss_mib:.0f} MiB | "
            f"{or_na(r.gpu_util, ' %')} | {or_na(r.gpu_mem_mib, ' MiB')} | {r.exact}/{r.streams} | "
            f"{r.client_cores:.2f} |"
        )


def growth(what: str, warm: float, end: float) -> str:
    return f"{what} after warm-up {warm:.0f} MiB, at the end {end:.0f} MiB ({end / warm - 1:+.1%})"


def soak(
    pool: ClientPool, streams: int, minutes: float, warmup: float, pid: int, gpu: str | None, expected: list[str]
) -> None:
    """Rounds of `streams` streams back to back: `warmup` minutes (at least one round), then `minutes` more. RSS and
    GPU memory after the warm-up vs the end, and RSS at the half-way round vs the end (a leak keeps growing; an
    allocator warming up levels off). Every round's transcripts are compared with the offline ones."""
    exact = total = 0

    def one_round() -> None:  # counts, without printing each round's differences
        nonlocal exact, total
        stats = pool.run(streams, time.monotonic() + START_DELAY_S)
        exact += sum(equals_offline(s, expected) for s in stats)
        total += len(stats)

    warm_end = time.monotonic() + warmup * 60
    one_round()
    while time.monotonic() < warm_end:
        one_round()
    start = time.monotonic()
    end = start + minutes * 60
    warm_rss, warm_gpu = proc_sample(pid)[1], gpu_query(gpu).mem_mib if gpu else None
    series = [(time.monotonic() - start, warm_rss)]  # (seconds, RSS MiB) after each round
    while time.monotonic() < end:
        one_round()
        series.append((time.monotonic() - start, proc_sample(pid)[1]))
    rounds = len(series) - 1  # series starts with the warmed-up baseline
    end_rss, end_gpu = series[-1][1], gpu_query(gpu).mem_mib if gpu else None
    step = max(1, rounds // 12)
    print("soak RSS (s: MiB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in series[::step]), flush=True)
    half_t, half_rss = series[rounds // 2]
    print(
        f"soak: RSS at {half_t:.0f} s {half_rss:.0f} MiB, at the end {end_rss:.0f} MiB ({end_rss / half_rss - 1:+.1%})"
    )
    gpu_text = growth("GPU memory (nvidia-smi)", warm_gpu, end_gpu) if gpu else "GPU memory n/a"
    print(
        f"soak: {minutes:g} min after {warmup:g} min of warm-up, {streams} streams, {rounds} rounds; "
        f"{growth('RSS', warm_rss, end_rss)}; {gpu_text} "
        f"(target: each within 5 %); transcripts = offline: {exact}/{total} streams, warm-up included",
        flush=True,
    )


# ---------------------------------------------------------------- main


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16], help="N values to run")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model directory (default: the bundled one)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the server's device (default: cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="asr serve --dtype (default: float32)")
    p.add_argument("--max-streams", type=positive_int, help="the server's slots (default: the largest N)")
    p.add_argument("--chunk-ms", type=positive_int, default=100, help="audio per client message (default: 100)")
    default_procs = max(1, min(8, (os.cpu_count() or 2) // 2))
    p.add_argument(
        "--client-procs",
        type=positive_int,
        default=default_procs,
        help=f"client processes the streams are spread over (default here: {default_procs}, "
        "i.e. half the CPU cores, at most 8)",
    )
    p.add_argument(
        "--soak-minutes",
        type=float,
        default=0.0,
        help="then rounds of the last N back to back for this long (default: 0: no soak)",
    )
    p.add_argument(
        "--soak-warmup-minutes",
        type=float,
        default=5.0,
        help="soak rounds before the baseline RSS and GPU memory are taken (default: 5; at least one round)",
    )
    p.add_argument("--no-lm", action="store_true", help="greedy finals (default: the model's LM, if it has one)")
    p.add_argument("--workers", type=positive_int, default=1, help="asr serve --workers (default: 1)")
    p.add_argument("--lm-processes", type=int, default=2, help="asr serve --lm-processes (default: 2)")
    p.add_argument(
        "--step-process",
        action="store_true",
        help="asr serve --step-process (with --workers; default: --no-step-process)",
    )
    args = p.parse_args()
    args.max_streams = args.max_streams or max(args.streams)
    if args.max_streams < max(args.streams):
        p.error(f"--max-streams {args.max_streams} is below the largest N {max(args.streams)}")
    return args


def main() -> None:
    args = parse_args()
    gpu = gpu_to_watch(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_clips(Path(tmp))
        expected = reference_transcripts(paths, args.model, args.device, args.dtype, not args.no_lm)
        clips = [sf.read(c, dtype="float32")[0] for c in paths]
    server = start_server(args)
    print(f"asr serve --device {args.device} --dtype {args.dtype} --workers {args.workers}", flush=True)
    rows = []
    try:
        with ClientPool(args.client_procs, server.url, clips, args.chunk_ms) as pool:
            pool.run(1, time.monotonic() + START_DELAY_S)  # warm-up: kernel compilation and first allocations
            for n in args.streams:
                r = measure(pool, server.proc.pid, n, expected, gpu)
                rows.append(r)
                print(
                    f"N={n}: partial p99 {r.partial_p99:.0f} ms, final p99 {r.final_p99:.0f} ms, "
                    f"cpu {r.cpu_cores:.2f}, gpu {or_na(r.gpu_util, ' %')}, exact {r.exact}/{n}, "
                    f"busiest client {r.client_cores:.2f} cores",
                    flush=True,
                )
            if args.soak_minutes:
                minutes = (args.soak_minutes, args.soak_warmup_minutes)
                soak(pool, args.streams[-1], *minutes, server.proc.pid, gpu, expected)
    finally:
        stop_server(server)
    print_table(rows)


if __name__ == "__main__":
    main()
