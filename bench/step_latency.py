"""Streaming step latency and throughput of the whole encoder: the fused Triton step under CUDA graphs against
the eager and plain-PyTorch steps and a KV-cache Transformer of the same width; latency against stream position;
and the memory-bandwidth floor of every configuration.

On one H200 (the whole run takes a few minutes):

    source scripts/device_env.sh && python3 bench/step_latency.py --out $OUT
    python bench/step_latency.py --quick --device cpu --out /tmp/steplat      # CPU smoke test, tiny model

(`scripts/device_env.sh` puts this checkout and the carried wheels on PYTHONPATH; setting PYTHONPATH yourself
there would drop the wheels.)

The model is `ModelDimensions()`: 12 layers, d_model 256, d_state 64, head_dim 64, the issue's "12 layers with d_model
256"; `--layers 16` gives the bundled default model's size (models/default, deepened to 16 layers). Weights are random
(`--seed`) and cast to `--dtype`; the SSM state is float32 whatever the dtype. A step takes B streams by L encoder
frames: raw log-mel features (B, 4 L, 80) float32 on the device in, log-probabilities (B, L, V) float32 out. One
encoder frame is 40 ms of audio, so a real-time stream needs 25 of them a second.

Systems, each built (state pool, graphs, KV caches) before its timed steps, which then only step:
- triton+graph: `EncoderStepper(graphs=True, fused=True)`, the fused Triton step replayed as one CUDA graph;
- triton eager: `EncoderStepper(graphs=False, fused=True)`, the same kernels launched one by one;
- torch eager: `EncoderStepper(graphs=False, fused=False)`, the pure-PyTorch step (the reference);
- torch+graph: `EncoderStepper(graphs=True, fused=False)`, the PyTorch step under a CUDA graph;
- transformer kv: a causal pre-norm Transformer of the same width (n_layers, d_model, heads of head_dim,
  FFN 4 d_model) with the same front end and head, stepping L frames against a preallocated KV cache at a fixed
  context of 1 and of 60 minutes (static shapes: it attends over the whole filled context plus the L new
  frames, through `F.scaled_dot_product_attention`), under a CUDA graph. A configuration whose KV cache would
  exceed `--kv-limit-gb` is skipped.
On the CPU there are no graphs, and the model runs the Triton step only on CUDA (`Impl.pick`), so only
torch eager and the transformer (eagerly) run there.

Every number:
- median / p99 us: wall time of one step, `time.perf_counter` around the call and a device synchronize, after
  `--warmup` untimed steps; at most `--iters` steps or `--max-seconds` a configuration (at least one step).
  Per-step timing is what a live stream sees: a step's log-probs are read before its captions go out. Before
  anything is timed, `--spin-up-seconds` of matmuls raise an idle GPU's clocks;
- frames/s = B L / median; streams = frames/s / 25, real-time streams one GPU could keep up with;
- floor us = bytes one step must move / the device's copy bandwidth (a `--bandwidth-mib` tensor copy, bytes read
  plus written). Bytes: all weights at their dtype, plus each stream's state read and written (2 x the pool row
  of `EncoderState`; for the transformer the whole KV cache read, the L new rows written, and the front-end
  caches), plus the input features and output log-probabilities; gap = median / floor;
- position: the first system (triton+graph on CUDA) at batch 1, chunk 1, two streams of the same model, each
  its own one-stream stepper (state pool and, on CUDA, graph), warmed up and zeroed. Sequential: stream A steps
  `--position-steps` steps (90,000: 60 minutes of 40 ms frames), each timed as above; the median over the first
  and the last minute (1,500 steps) and their ratio. This compares windows an hour apart, so it also measures
  whatever the GPU's clocks did in between: on the H200 the step moved between plateaus of about 155 and 190 us
  within the hour, and the ratio came out 0.825 or 1.101 by where they fell. Interleaved: then A (now at minute
  60) and the fresh stream B (at minute 0) step alternately A, B, A, B for one window (1,500 steps each: B's
  minute 1), each step timed by wall clock as above and, on CUDA, by GPU time (a pair of
  `torch.cuda.Event(enable_timing=True)` recorded on the current stream before and after the call, read after
  the sync: the call's span on the GPU's timeline, without the host's wake-up from the sync but with any idle
  gap while the host issues the call's work); the medians of A and B and their ratio. Both streams share the
  same seconds, so the ratio separates the position from the time. Last, the transformer's median at contexts
  of 1, 5, 15, 30 and 60 minutes (scaled to `--position-steps`). Plotted to step_latency_position.png: the
  sequential stream in bins, the interleaved medians and the transformer.

Targets (printed, never enforced): triton+graph at batch 1, chunk 1 <= 50 us; >= 5,000,000 frames/s at batch
1024 with chunks (the best of the chunks of 2 to 16 frames swept: the issue's 4 and 8, and 16 if `--chunks` names
it); minute-60 / minute-1 latency 1.00 +- 0.05 (sequential, and interleaved by each clock). For reference, the
issue quotes about 430 us a frame for mamba_ssm's selective_state_update under a
CUDA graph at batch 1.

Writes OUT/step_latency.json (every row), OUT/step_latency.md (the printed tables) and
OUT/step_latency_position.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: draws with Agg, needs no display
from torch import nn

from asr.features import N_MELS, SUBSAMPLING
from asr.model import ASRModel, EncoderState, FrontEndState, ModelDimensions, RMSNorm, Subsampling
from asr.ssm import halved
from asr.stepper import EncoderStepper
from kernels.step import MAX_FRAMES

FRAMES_PER_SECOND = 25  # encoder frames (40 ms) in a second of audio: one real-time stream
MINUTE = 60 * FRAMES_PER_SECOND  # 1,500 encoder frames
MAMBA_SYSTEMS = {  # name -> (graphs, fused)
    "triton+graph": (True, True),
    "triton eager": (False, True),
    "torch eager": (False, False),
    "torch+graph": (True, False),
}
TRANSFORMER = "transformer kv"
SYSTEMS = (*MAMBA_SYSTEMS, TRANSFORMER)
POSITION_MINUTES = (1, 5, 15, 30, 60)  # the transformer's context positions, in minutes of a 60-minute stream
REFERENCE_US = 430.0  # the issue's mamba_ssm selective_state_update + CUDA graph, batch 1, one frame
QUICK_DIMS = ModelDimensions(d_model=32, n_layers=2, d_state=8, head_dim=8, frontend_channels=8)
QUICK = {  # --quick changes these defaults; flags given explicitly still win
    "device": "cpu",
    "batches": [1, 2],
    "chunks": [1, 2],
    "kv_contexts": [50, 500],
    "iters": 5,
    "warmup": 2,
    "max_seconds": 0.5,
    "position_steps": 300,
    "bandwidth_mib": 64,
}


@dataclass
class Row:
    """One system at one configuration; the timing fields are None when `skipped` says why it did not run."""

    system: str
    batch: int
    chunk: int  # L, encoder frames a step
    context: int  # frames already in the KV cache (transformer kv), 0 otherwise
    skipped: str = ""
    steps: int = 0  # timed steps
    median_us: float | None = None
    p99_us: float | None = None
    frames_per_s: float | None = None
    streams: float | None = None  # real-time streams: frames_per_s / 25
    floor_us: float | None = None
    gap: float | None = None  # median / floor

    @property
    def label(self) -> str:
        if self.system != TRANSFORMER:
            return self.system
        span = f"{self.context // MINUTE} min" if self.context % MINUTE == 0 else f"{self.context:,} frames"
        return f"{self.system} ({span} context)"


@dataclass
class PositionPoint:
    minutes: float  # stream position
    median_us: float


@dataclass
class Medians:
    """Step times of the late stream (A, past the end of the position stream) and the fresh one (B) under one
    clock, taken alternately."""

    late_us: float  # median of A's steps
    fresh_us: float  # median of B's steps
    ratio: float  # late / fresh


@dataclass
class Interleaved:
    """Stream A at the end of the position stream and a fresh stream B, stepped alternately A, B, A, B."""

    pairs: int  # steps of each stream (the window: 1,500 steps, B's first minute)
    wall: Medians  # perf_counter around each step and a device sync
    gpu: Medians | None  # CUDA events around each step on the current stream; None off CUDA

    def by_clock(self) -> dict[str, Medians]:
        """The medians of each clock measured, by its name in the tables."""
        return {"wall": self.wall} | ({"GPU events": self.gpu} if self.gpu is not None else {})


@dataclass
class Position:
    """Latency against stream position, batch 1, chunk 1."""

    system: str
    steps: int
    window_steps: int  # the first and last windows compared (1,500 steps: one minute)
    first_us: float  # median over the first window
    last_us: float  # median over the last window
    ratio: float  # last / first
    binned: list[PositionPoint]  # medians over equal bins of the whole stream, for the plot
    transformer: list[Row]  # batch 1, chunk 1, at contexts spread over the stream
    interleaved: Interleaved  # position apart from time: a late and a fresh stream stepped alternately


@dataclass
class Target:
    name: str
    goal: str
    value: str
    met: bool | None  # None: not measured in this run


@dataclass
class Report:
    date: str
    device: str
    torch_version: str
    dtype: str
    dims: ModelDimensions
    default_size: bool  # dims == ModelDimensions(): the issue's "12 layers with d_model 256"
    encoder_weight_bytes: int
    state_row_bytes: int  # one stream's EncoderState
    transformer_weight_bytes: int
    copy_bandwidth_gbs: float  # read + write, GB/s
    timing: str
    rows: list[Row]
    position: Position
    targets: list[Target]


# ---------------------------------------------------------------- timing and bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, args: argparse.Namespace) -> np.ndarray:
    """Seconds of each timed call of `step`: `args.warmup` untimed calls, then up to `args.iters` calls or until
    `args.max_seconds` have passed (at least one), each timed with perf_counter around the call and a sync."""
    for _ in range(args.warmup):
        step()
    sync(device)
    times: list[float] = []
    end = time.perf_counter() + args.max_seconds
    while len(times) < args.iters and (not times or time.perf_counter() < end):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return np.array(times)


def spin_up(device: torch.device, seconds: float) -> None:
    """Keep the device busy for `seconds` (back-to-back 4,096 x 4,096 matmuls, a sync every 50), so that an idle GPU's
    clocks have risen before anything is timed. Measured on a freshly started H200 (session 16): the first 1,500
    steps of batch 1 x 1 took a median 111 us and steps 20,000 on 90 us, with no spin-up."""
    if device.type != "cuda" or seconds <= 0:
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            a @ a
        sync(device)


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 10) -> float:
    """Bytes a second of a device-to-device tensor copy of `mib` MiB, counting bytes read plus written
    (`repeats` back-to-back copies between two syncs, after one untimed copy)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - start)


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def row_bytes(state: EncoderState) -> int:
    """Bytes of one stream's row of every tensor of a state pool."""
    return sum(t[0].numel() * t.element_size() for t in state.tensors())


def io_bytes(batch: int, chunk: int, vocab: int) -> int:
    """float32 features (B, 4 L, n_mels) in and float32 log-probs (B, L, V) out."""
    return 4 * batch * chunk * (SUBSAMPLING * N_MELS + vocab)


def measured(
    system: str, batch: int, chunk: int, context: int, times: np.ndarray, floor_bytes: int, bandwidth: float
) -> Row:
    median = float(np.median(times))
    floor = floor_bytes / bandwidth
    fps = batch * chunk / median
    return Row(
        system,
        batch,
        chunk,
        context,
        steps=len(times),
        median_us=1e6 * median,
        p99_us=1e6 * float(np.percentile(times, 99)),
        frames_per_s=fps,
        streams=fps / FRAMES_PER_SECOND,
        floor_us=1e6 * floor,
        gap=median / floor,
    )


# ---------------------------------------------------------------- the Mamba encoder


def unavailable(system: str, device: torch.device) -> str:
    """Why a Mamba system cannot run on `device`, or '' if it can."""
    graphs, fused = MAMBA_SYSTEMS[system]
    if fused and device.type != "cuda":
        return f"the model runs the Triton step only on CUDA (Impl.pick); on {device.type} it would be torch eager"
    if graphs and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return ""


def make_stepper(model: ASRModel, system: str, capacity: int, device: torch.device) -> EncoderStepper:
    graphs, fused = MAMBA_SYSTEMS[system]
    return EncoderStepper(model, capacity, device, graphs=graphs, fused=fused)


def mamba_rows(
    model: ASRModel,
    system: str,
    inputs: dict[tuple[int, int], torch.Tensor],
    device: torch.device,
    bandwidth: float,
    args: argparse.Namespace,
) -> list[Row]:
    """Every (batch, chunk) of `inputs` (feats (B, 4 L, n_mels)) through one stepper with a pool of max(batch)."""
    reason = unavailable(system, device)
    if reason:
        return [Row(system, b, l, 0, skipped=reason) for b, l in inputs]
    stepper = make_stepper(model, system, max(args.batches), device)
    stepper.warmup(args.chunks, args.batches)  # captures every graph now (a no-op without graphs)
    weights, row = param_bytes(model), row_bytes(stepper.pool)
    rows = []
    for (b, l), feats in inputs.items():
        slots = list(range(b))
        times = time_steps(lambda f=feats, s=slots: stepper(f, s), device, args)
        floor_bytes = weights + 2 * row * b + io_bytes(b, l, model.dims.vocab_size)
        rows.append(measured(system, b, l, 0, times, floor_bytes, bandwidth))
    return rows


# ---------------------------------------------------------------- the KV-cache Transformer


class Block(nn.Module):
    """Pre-norm causal self-attention and GELU FFN, stepped against a KV cache."""

    def __init__(self, d_model: int, head_dim: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.head_dim = d_model // head_dim, head_dim
        self.norm1 = RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = RMSNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))

    def step(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model). k, v (B, heads, context + L, head_dim): frames [0, context) are
        the past; the L new keys and values are written at [context, context + L), then all are attended to,
        causally among the new frames by `mask` (L, context + L) bool (None for L = 1)."""
        b, l, d = x.shape
        q, k_new, v_new = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k[:, :, context:].copy_(k_new)
        v[:, :, context:].copy_(v_new)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L, head_dim)
        x = x + self.proj(a.transpose(1, 2).reshape(b, l, d))
        return x + self.ffn(self.norm2(x))


class TransformerKV(nn.Module):
    """The baseline: `ASRModel`'s front end and head around n_layers causal Transformer blocks of the same width
    (heads of head_dim, FFN 4 d_model, no positional encoding). Input and CMVN as `ASRModel` (identity CMVN)."""

    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        self.dims = dims
        self.register_buffer("cmvn_mean", torch.zeros(dims.n_mels), persistent=False)
        self.register_buffer("cmvn_istd", torch.ones(dims.n_mels), persistent=False)
        self.frontend = Subsampling(dims)
        self.blocks = nn.ModuleList(Block(dims.d_model, dims.head_dim, 4 * dims.d_model) for _ in range(dims.n_layers))
        self.norm_f = RMSNorm(dims.d_model)
        self.head = nn.Linear(dims.d_model, dims.vocab_size)

    def kv_row_bytes(self) -> int:
        """KV cache bytes of one frame of one stream, all layers."""
        return 2 * self.dims.n_layers * self.dims.d_model * self.head.weight.element_size()

    def frontend_row_bytes(self) -> int:
        d = self.dims
        return (d.n_mels + d.frontend_channels * halved(d.n_mels)) * self.head.weight.element_size()


class KVStepper:
    """B streams of a `TransformerKV` stepping L frames at a fixed context position, every buffer allocated here.

    The KV caches are (B, heads, context + L, head_dim) per layer, zeros: attention costs the same whatever they
    hold. Each step rewrites the same L cache rows, so the shapes are static and the step can be one CUDA graph
    (captured here after two warm-up steps on a side stream, as `asr.stepper` does).
    """

    def __init__(
        self, model: TransformerKV, batch: int, chunk: int, context: int, device: torch.device, graphs: bool
    ) -> None:
        d, dtype = model.dims, model.head.weight.dtype
        self.model, self.context = model, context
        shape = (batch, d.d_model // d.head_dim, context + chunk, d.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(d.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(d.n_layers)]
        self.frontend = FrontEndState(
            conv1=torch.zeros(batch, 1, 1, d.n_mels, dtype=dtype, device=device),
            conv2=torch.zeros(batch, d.frontend_channels, 1, halved(d.n_mels), dtype=dtype, device=device),
        )
        frames = torch.arange(context + chunk, device=device)
        new = context + torch.arange(chunk, device=device)
        self.mask = frames[None, :] <= new[:, None] if chunk > 1 else None  # (L, context + L)
        self.feats = torch.zeros(batch, SUBSAMPLING * chunk, N_MELS, device=device)
        self.graph = self._capture(device) if graphs else None

    @staticmethod
    def cache_bytes(model: TransformerKV, batch: int, chunk: int, context: int) -> int:
        return batch * (context + chunk) * model.kv_row_bytes()

    def _eager(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, 4 L, n_mels) -> log-probs (B, L, V) float32."""
        m = self.model
        x, _ = m.frontend.chunk(((feats - m.cmvn_mean) * m.cmvn_istd).to(m.head.weight.dtype), self.frontend)
        for block, k, v in zip(m.blocks, self.k, self.v, strict=True):
            x = block.step(x, k, v, self.context, self.mask)
        return m.head(m.norm_f(x)).float().log_softmax(-1)

    def _capture(self, device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._eager(self.feats)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager(self.feats)
        return graph, out

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, 4 L, n_mels) on the device -> log-probs (B, L, V); under a graph, a buffer the next call reuses."""
        if self.graph is None:
            return self._eager(feats)
        graph, out = self.graph
        self.feats.copy_(feats)
        graph.replay()
        return out


def transformer_row(
    model: TransformerKV,
    batch: int,
    chunk: int,
    context: int,
    feats: torch.Tensor,
    device: torch.device,
    bandwidth: float,
    args: argparse.Namespace,
) -> Row:
    """One configuration of the transformer, or a skipped row if its KV cache is over --kv-limit-gb."""
    cache = KVStepper.cache_bytes(model, batch, chunk, context)
    if cache > args.kv_limit_gb * 1e9:
        return Row(TRANSFORMER, batch, chunk, context, skipped=f"KV cache would need {cache / 1e9:,.1f} GB")
    stepper = KVStepper(model, batch, chunk, context, device, graphs=device.type == "cuda")
    times = time_steps(lambda: stepper(feats), device, args)
    state = cache + batch * chunk * model.kv_row_bytes() + 2 * batch * model.frontend_row_bytes()
    floor_bytes = param_bytes(model) + state + io_bytes(batch, chunk, model.dims.vocab_size)
    return measured(TRANSFORMER, batch, chunk, context, times, floor_bytes, bandwidth)


def transformer_rows(
    model: TransformerKV,
    inputs: dict[tuple[int, int], torch.Tensor],
    device: torch.device,
    bandwidth: float,
    args: argparse.Namespace,
) -> list[Row]:
    """Each --kv-contexts by each (batch, chunk); one configuration's caches at a time."""
    rows = []
    for context in args.kv_contexts:
        for (b, l), feats in inputs.items():
            rows.append(transformer_row(model, b, l, context, feats, device, bandwidth, args))
            free(device)
    return rows


# ---------------------------------------------------------------- latency against stream position


Events = tuple[torch.cuda.Event, torch.cuda.Event]


def position_system(device: torch.device) -> str:
    return next(s for s in MAMBA_SYSTEMS if not unavailable(s, device))


def position_stepper(
    model: ASRModel, system: str, feats: torch.Tensor, device: torch.device, warmup: int
) -> EncoderStepper:
    """A one-stream stepper of `system` with its batch-1, chunk-1 graph captured and `warmup` steps of `feats`
    (1, 4, n_mels) run, then its stream zeroed: a stream at position 0."""
    stepper = make_stepper(model, system, 1, device)
    stepper.warmup([1], [1])
    for _ in range(warmup):
        stepper(feats, [0])
    stepper.reset([0])
    sync(device)
    return stepper


def timing_events(device: torch.device) -> Events | None:
    """A start and an end event that record GPU time, on CUDA; None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def timed_step(
    stepper: EncoderStepper, feats: torch.Tensor, device: torch.device, events: Events | None = None
) -> tuple[float, float]:
    """Seconds of one step of the stepper's stream: wall (perf_counter around the call and a device sync) and GPU
    (`events` recorded on the current stream before and after the call, read after the sync; nan without)."""
    start = time.perf_counter()
    if events:
        events[0].record()
    stepper(feats, [0])
    if events:
        events[1].record()
    sync(device)
    wall = time.perf_counter() - start
    return wall, events[0].elapsed_time(events[1]) / 1e3 if events else float("nan")


def stream_latency(stepper: EncoderStepper, feats: torch.Tensor, steps: int, device: torch.device) -> np.ndarray:
    """Wall seconds of each of `steps` consecutive steps of the stepper's stream, which they advance."""
    return np.array([timed_step(stepper, feats, device)[0] for _ in range(steps)])


def medians(times: np.ndarray) -> Medians:
    """times (pairs, 2) seconds, the late stream's then the fresh one's."""
    late, fresh = (float(np.median(times[:, i])) for i in range(2))
    return Medians(1e6 * late, 1e6 * fresh, late / fresh)


def interleaved(
    late: EncoderStepper, fresh: EncoderStepper, feats: torch.Tensor, pairs: int, device: torch.device
) -> Interleaved:
    """`pairs` steps of each of two streams, alternately late, fresh, late, fresh, each timed by `timed_step`
    (wall and, on CUDA, GPU): both see the same seconds of the device's clocks, at different positions."""
    events = timing_events(device)
    times = np.array([[timed_step(s, feats, device, events) for s in (late, fresh)] for _ in range(pairs)])
    return Interleaved(pairs, medians(times[:, :, 0]), medians(times[:, :, 1]) if events else None)


def binned(times: np.ndarray, bins: int = 360) -> list[PositionPoint]:
    """Medians of `bins` equal runs of consecutive steps, at their centre (minutes)."""
    edges = np.linspace(0, len(times), min(bins, len(times)) + 1).astype(int)
    return [
        PositionPoint(minutes=(lo + hi) / 2 / MINUTE, median_us=1e6 * float(np.median(times[lo:hi])))
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]


def transformer_positions(
    transformer: TransformerKV, feats: torch.Tensor, device: torch.device, bandwidth: float, args: argparse.Namespace
) -> list[Row]:
    """The transformer at batch 1, chunk 1, at contexts of POSITION_MINUTES scaled to --position-steps."""
    contexts = sorted({max(1, round(args.position_steps * m / POSITION_MINUTES[-1])) for m in POSITION_MINUTES})
    rows = []
    for context in contexts:
        rows.append(transformer_row(transformer, 1, 1, context, feats, device, bandwidth, args))
        free(device)
    return rows


def position(
    model: ASRModel, transformer: TransformerKV, device: torch.device, bandwidth: float, args: argparse.Namespace
) -> Position:
    """Stream A through --position-steps timed steps from position 0 (the sequential windows and the plot), then
    A and a fresh stream B alternately for one window each (the interleaved ratio), then the transformer."""
    system = position_system(device)
    feats = torch.randn(1, SUBSAMPLING, N_MELS, device=device)
    late, fresh = (position_stepper(model, system, feats, device, args.warmup) for _ in range(2))
    times = stream_latency(late, feats, args.position_steps, device)
    window = min(MINUTE, args.position_steps // 2)
    first, last = float(np.median(times[:window])), float(np.median(times[-window:]))
    pair = interleaved(late, fresh, feats, window, device)
    rows = transformer_positions(transformer, feats, device, bandwidth, args)
    return Position(
        system, args.position_steps, window, 1e6 * first, 1e6 * last, last / first, binned(times), rows, pair
    )


# ---------------------------------------------------------------- targets, tables, plot


def find(rows: list[Row], system: str, batch: int, chunks: tuple[int, ...]) -> list[Row]:
    return [r for r in rows if r.system == system and r.batch == batch and r.chunk in chunks and r.median_us]


def targets(rows: list[Row], pos: Position) -> list[Target]:
    one = find(rows, "triton+graph", 1, (1,))
    wide = find(rows, "triton+graph", 1024, tuple(range(2, MAX_FRAMES + 1)))  # any chunk the fused step takes
    best = max(wide, key=lambda r: r.frames_per_s or 0.0) if wide else None
    return [
        Target(
            "triton+graph, batch 1, chunk 1",
            "<= 50 us a step",
            f"{one[0].median_us:.1f} us ({REFERENCE_US / one[0].median_us:.1f}x faster than the issue's "
            f"{REFERENCE_US:.0f} us for mamba_ssm's selective_state_update + CUDA graph)"
            if one
            else "not run",
            one[0].median_us <= 50 if one else None,
        ),
        Target(
            f"triton+graph, batch 1024, best chunk of 2-{MAX_FRAMES} swept",
            ">= 5,000,000 frames/s",
            f"{best.frames_per_s:,.0f} frames/s (chunk {best.chunk})" if best else "not run",
            best.frames_per_s >= 5e6 if best else None,
        ),
        Target(
            f"{pos.system}, last / first {pos.window_steps} steps of {pos.steps}",
            "1.00 +- 0.05",
            f"{pos.ratio:.3f}",
            abs(pos.ratio - 1) <= 0.05,
        ),
        *interleaved_targets(pos),
    ]


def interleaved_targets(pos: Position) -> list[Target]:
    """The minute-60 / minute-1 target on the interleaved streams, one row a clock measured."""
    return [
        Target(
            f"{pos.system}, interleaved late / fresh {pos.interleaved.pairs} steps ({clock})",
            "1.00 +- 0.05",
            f"{m.ratio:.3f}",
            abs(m.ratio - 1) <= 0.05,
        )
        for clock, m in pos.interleaved.by_clock().items()
    ]


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def rows_table(rows: list[Row]) -> list[str]:
    out = [
        "| system | batch | chunk | median us | p99 us | frames/s | streams | floor us | gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.skipped:
            out.append(f"| {r.label} | {r.batch} | {r.chunk} | skipped: {r.skipped} | | | | | |")
            continue
        out.append(
            f"| {r.label} | {r.batch} | {r.chunk} | {fmt(r.median_us, ',.1f')} | {fmt(r.p99_us, ',.1f')} | "
            f"{fmt(r.frames_per_s, ',.0f')} | {fmt(r.streams, ',.0f')} | {fmt(r.floor_us, ',.2f')} | "
            f"{fmt(r.gap, ',.1f')}x |"
        )
    return out


def minute(window: int, end: int) -> str:
    """' (minute N)' when a window of steps ending at step `end` is exactly minute N of the stream, else ''."""
    return f" (minute {end // MINUTE})" if window == MINUTE and end % MINUTE == 0 else ""


def interleaved_table(pos: Position) -> list[str]:
    inter = pos.interleaved
    late = f"A: steps {pos.steps:,} to {pos.steps + inter.pairs:,}{minute(inter.pairs, pos.steps + inter.pairs)}"
    fresh = f"B: steps 0 to {inter.pairs:,}{minute(inter.pairs, inter.pairs)}"
    clocks = inter.by_clock()
    return [
        f"Interleaved: stream A, after the {pos.steps:,} steps above, and a fresh stream B (its own stepper: state "
        f"pool and, on CUDA, graph; same model) stepped alternately A, B, A, B for {inter.pairs:,} steps each, "
        "every step timed. The two streams' steps share the same seconds, so a change of the device's clocks (or "
        "anything else that drifts with time) lands on both alike; the sequential ratio compares windows "
        f"{pos.steps / MINUTE:g} min apart and does not control for it. The interleaved ratio thus isolates the "
        "stream position.",
        "",
        "| stream | " + " | ".join(clocks) + " |",
        "|---|" + "---:|" * len(clocks),
        f"| {late} median us | " + " | ".join(f"{m.late_us:,.1f}" for m in clocks.values()) + " |",
        f"| {fresh} median us | " + " | ".join(f"{m.fresh_us:,.1f}" for m in clocks.values()) + " |",
        "| ratio A / B | " + " | ".join(f"{m.ratio:.3f}" for m in clocks.values()) + " |",
    ]


def markdown(report: Report) -> str:
    d, pos = report.dims, report.position
    size = (
        "ModelDimensions() defaults: the issue's '12 layers with d_model 256'"
        if report.default_size
        else "not ModelDimensions() defaults"
    )
    lines = [
        "# Encoder step latency",
        "",
        f"{report.date}, {report.device}, torch {report.torch_version}, {report.dtype} weights, float32 SSM state.",
        f"Model: {d.n_layers} layers, d_model {d.d_model}, d_state {d.d_state}, head_dim {d.head_dim} ({size}); "
        f"weights {report.encoder_weight_bytes / 1e6:,.2f} MB (transformer {report.transformer_weight_bytes / 1e6:,.2f}"
        f" MB), state {report.state_row_bytes / 1e3:,.1f} kB a stream; copy bandwidth "
        f"{report.copy_bandwidth_gbs:,.0f} GB/s (read + write).",
        f"Timing: {report.timing}.",
        "",
        *rows_table(report.rows),
        "",
        f"## Latency against stream position ({pos.system}, batch 1, chunk 1, {pos.steps:,} steps = "
        f"{pos.steps / MINUTE:g} min)",
        "",
        "| window | median us |",
        "|---|---:|",
        f"| first {pos.window_steps:,} steps{minute(pos.window_steps, pos.window_steps)} | {pos.first_us:,.1f} |",
        f"| last {pos.window_steps:,} steps{minute(pos.window_steps, pos.steps)} | {pos.last_us:,.1f} |",
        f"| ratio last / first | {pos.ratio:.3f} |",
        "",
        *interleaved_table(pos),
        "",
        "Transformer KV, batch 1, chunk 1, against context:",
        "",
        *rows_table(pos.transformer),
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
        *(
            f"| {t.name} | {t.goal} | {t.value} | {'–' if t.met is None else 'yes' if t.met else 'no'} |"
            for t in report.targets
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path) -> None:
    pos = report.position
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot(
        [p.minutes for p in pos.binned],
        [p.median_us for p in pos.binned],
        label=f"{pos.system} (median of {max(1, pos.steps // len(pos.binned))}-step bins)",
    )
    inter = pos.interleaved
    ax.plot(
        [inter.pairs / 2 / MINUTE, (pos.steps + inter.pairs / 2) / MINUTE],
        [inter.wall.fresh_us, inter.wall.late_us],
        "s",
        label=f"{pos.system} interleaved fresh and late streams (wall median, ratio {inter.wall.ratio:.3f})",
    )
    kv = [r for r in pos.transformer if r.median_us]
    ax.plot([r.context / MINUTE for r in kv], [r.median_us for r in kv], "o-", label="transformer kv (median)")
    ax.axhline(50, color="grey", linestyle="--", linewidth=0.8, label="target 50 us")
    ax.set_yscale("log")
    ax.set_xlabel("stream position (minutes of 40 ms frames)")
    ax.set_ylabel("step latency (us)")
    d = report.dims
    ax.set_title(f"Batch 1, chunk 1: {d.n_layers} x {d.d_model}, {report.dtype}, {report.device}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- main


def log(message: str) -> None:
    """Progress on stderr (stdout holds the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


@torch.inference_mode()
def run(args: argparse.Namespace) -> Report:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dims = QUICK_DIMS if args.quick else replace(ModelDimensions(), n_layers=args.layers)
    torch.manual_seed(args.seed)
    model = ASRModel(dims).to(device, dtype).eval()
    transformer = TransformerKV(dims).to(device, dtype).eval()
    spin_up(device, args.spin_up_seconds)
    bandwidth = copy_bandwidth(device, args.bandwidth_mib)
    log(f"{device_name(device)}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    inputs = {(b, l): torch.randn(b, SUBSAMPLING * l, N_MELS, device=device) for b in args.batches for l in args.chunks}
    rows = []
    for system in args.systems:
        if system == TRANSFORMER:
            rows += transformer_rows(transformer, inputs, device, bandwidth, args)
        else:
            rows += mamba_rows(model, system, inputs, device, bandwidth, args)
        free(device)
        log(f"{system} done")
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows.sort(key=lambda r: (r.batch, r.chunk, order[r.system], r.context))
    pos = position(model, transformer, device, bandwidth, args)
    log(f"position: {pos.system} over {pos.steps:,} steps, transformer at {len(pos.transformer)} contexts, done")
    return Report(
        date=datetime.date.today().isoformat(),
        device=device_name(device),
        torch_version=torch.__version__,
        dtype=args.dtype,
        dims=dims,
        default_size=dims == ModelDimensions(),
        encoder_weight_bytes=param_bytes(model),
        state_row_bytes=row_bytes(model.init_state(1, device)),
        transformer_weight_bytes=param_bytes(transformer),
        copy_bandwidth_gbs=bandwidth / 1e9,
        timing=(
            f"perf_counter around each step and a device sync, after {args.spin_up_seconds:g} s of spin-up matmuls "
            f"and {args.warmup} warm-up steps; "
            f"at most {args.iters} steps or {args.max_seconds:g} s a configuration"
        ),
        rows=rows,
        position=pos,
        targets=targets(rows, pos),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for step_latency.{json,md} and the position PNG")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (eager systems only)")
    p.add_argument(
        "--layers",
        type=int,
        default=ModelDimensions().n_layers,
        help="Mamba layers (default %(default)s, the issue's 12 x 256; the bundled model has 16)",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and activations")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 4096], help="streams a step")
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8], help="encoder frames (40 ms) a step")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="which systems to sweep")
    p.add_argument(
        "--kv-contexts", type=int, nargs="+", default=[MINUTE, 60 * MINUTE], help="transformer KV context, frames"
    )
    p.add_argument("--kv-limit-gb", type=float, default=40.0, help="skip transformer configs with a larger KV cache")
    p.add_argument("--iters", type=int, default=50, help="most timed steps a configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each configuration's timed ones")
    p.add_argument("--max-seconds", type=float, default=3.0, help="most seconds of timed steps a configuration")
    p.add_argument(
        "--spin-up-seconds", type=float, default=10.0, help="seconds of matmuls first, so the GPU's clocks have risen"
    )
    p.add_argument(
        "--position-steps", type=int, default=60 * MINUTE, help="length of the position stream, steps of 40 ms"
    )
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the tensor copied to measure bandwidth")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the random weights and inputs")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CPU smoke test: a tiny model ({QUICK_DIMS.n_layers} x {QUICK_DIMS.d_model}) and small defaults: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    positive = ("batches", "chunks", "kv_contexts")
    if any(v <= 0 for name in positive for v in getattr(args, name)):
        p.error("--batches, --chunks and --kv-contexts must be positive")
    if min(args.iters, args.position_steps, args.bandwidth_mib, args.layers) <= 0 or args.warmup < 0:
        p.error("--iters, --position-steps, --bandwidth-mib and --layers must be positive, --warmup not negative")
    if args.position_steps < 2:
        p.error("--position-steps must be at least 2 (a first and a last window)")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; try --quick --device cpu")
    return args


def main() -> None:
    args = parse_args()
    report = run(args)
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_latency.md").write_text(text)
    (args.out / "step_latency.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    plot(report, args.out / "step_latency_position.png")
    print(f"wrote {args.out}/step_latency.json, step_latency.md, step_latency_position.png")


if __name__ == "__main__":
    main()
