"""Where a server's model compute runs: in the worker itself (`LocalCompute`) or in one step process that
serves every worker of `asr serve --workers N --step-process` (`run_step_process`, `RemoteCompute`).

A worker's engine needs three things: log-mel features of framed audio, one batched step of the encoder over
some of its state slots, and a slot reset at the start of a stream. `LocalCompute` does them on the worker's own
device (an `EncoderStepper` and a `LogMel`). With several workers on one GPU, each worker stepping its own small
batches keeps the GPU busy with many small graph launches that take turns; the step process instead owns the one
state pool of all workers (worker i has slots [i S, (i + 1) S)) and the model, and steps the requests of every
worker that is waiting in one batched call. Requests travel over a pipe per worker (a few bytes); the tensors
travel through shared-memory buffers that the parent allocates before it starts the processes.

The step process computes exactly what `LocalCompute` computes (the same LogMel and EncoderStepper on the same
device), so finals still equal `asr transcribe`. It runs until every worker has hung up (it ignores SIGTERM and
SIGINT: the workers still need it to drain their streams).

Shapes: S slots of one worker, T frames of audio (WINDOW_SAMPLES samples each), L encoder frames (L <= 16),
V vocabulary.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Protocol

import torch

from asr.checkpoint import load_model
from asr.features import N_MELS, SUBSAMPLING, WINDOW_SAMPLES, LogMel
from asr.model import ASRModel
from asr.stepper import MAX_GRAPH_FRAMES, EncoderStepper

WINDOW_ROWS = 4096  # audio frames (41 s of audio) a worker sends in one features request; more go in pieces
STEP_THREADS = 4  # torch CPU threads of the step process (its CPU work: joining and splitting the batches)


class Compute(Protocol):
    """The model compute an engine needs; tensors it returns live on `device`."""

    device: torch.device

    def features(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (T, WINDOW_SAMPLES) -> log-mel (T, N_MELS)."""

    def inputs(self, batch: int, frames: int) -> torch.Tensor:
        """A buffer (batch, 4 frames, N_MELS) float32 on `device` for a step's features: a step given it (filled)
        may skip a copy (`LocalCompute`'s is the CUDA graph's own input). The next step of that shape reuses it."""

    def step(self, feats: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """feats (B, 4 L, N_MELS) of the streams in `slots` -> log-probs (B, L, V) float32, advancing them."""

    def reset(self, slots: list[int]) -> None:
        """Zero these slots' state: the start of new streams."""


class LocalCompute:
    """The model on this process's device: an `EncoderStepper` (CUDA graphs captured now) and a `LogMel`."""

    def __init__(self, model: ASRModel, capacity: int, device: torch.device) -> None:
        self.device = device
        self.stepper = EncoderStepper(model, capacity, device)
        self.stepper.warmup(range(1, MAX_GRAPH_FRAMES + 1))  # CUDA graphs up front, not mid-stream
        self.logmel = LogMel().to(device)

    def features(self, windows: torch.Tensor) -> torch.Tensor:
        return self.logmel.frames(windows.to(self.device, non_blocking=True))

    def inputs(self, batch: int, frames: int) -> torch.Tensor:
        return self.stepper.inputs(batch, frames)

    def step(self, feats: torch.Tensor, slots: list[int]) -> torch.Tensor:
        return self.stepper(feats, slots)

    def reset(self, slots: list[int]) -> None:
        self.stepper.reset(slots)


@dataclass
class SharedBuffers:
    """One worker's shared-memory tensors (allocated by the parent, mapped by the worker and the step process)."""

    windows: torch.Tensor  # (WINDOW_ROWS, WINDOW_SAMPLES) float32: audio frames in
    feats: torch.Tensor  # (WINDOW_ROWS, N_MELS) float32: their log-mel out
    step_in: torch.Tensor  # (S, 4 * MAX_GRAPH_FRAMES, N_MELS) float32: a step's features in
    slots: torch.Tensor  # (S,) int64: a step's slots (the worker's own numbering)
    step_out: torch.Tensor  # (S, MAX_GRAPH_FRAMES, V) float32: a step's log-probs out

    @staticmethod
    def allocate(slots: int, vocab: int) -> SharedBuffers:
        def zeros(*shape: int, dtype=torch.float32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype).share_memory_()

        return SharedBuffers(
            windows=zeros(WINDOW_ROWS, WINDOW_SAMPLES),
            feats=zeros(WINDOW_ROWS, N_MELS),
            step_in=zeros(slots, SUBSAMPLING * MAX_GRAPH_FRAMES, N_MELS),
            slots=zeros(slots, dtype=torch.int64),
            step_out=zeros(slots, MAX_GRAPH_FRAMES, vocab),
        )


class StepProcessError(Exception):
    """The step process answered a request with an error, or is gone."""


@dataclass(frozen=True)
class Reset:
    """Zero the worker's slots `slots`."""

    slots: tuple[int, ...]


@dataclass(frozen=True)
class Features:
    """Log-mel of the first `rows` rows of the worker's `windows` buffer, into its `feats` buffer."""

    rows: int


@dataclass(frozen=True)
class Step:
    """One step of `frames` encoder frames for the first `batch` rows of the worker's `step_in` and `slots`
    buffers, log-probs into its `step_out` buffer."""

    batch: int
    frames: int


Request = Reset | Features | Step


class RemoteCompute:
    """A worker's side of the step process: one request at a time over `conn`, tensors through `buffers`.
    Results are CPU tensors of their own (copied out of the buffers, which the next request overwrites: the
    engine keeps log-probs for the language model)."""

    device = torch.device("cpu")

    def __init__(self, conn: Connection, buffers: SharedBuffers) -> None:
        self.conn = conn
        self.buffers = buffers

    def features(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.shape[0] == 0:
            return windows.new_zeros(0, N_MELS)
        parts = []
        for piece in windows.split(WINDOW_ROWS):
            n = piece.shape[0]
            self.buffers.windows[:n].copy_(piece)
            self._ask(Features(n))
            parts.append(self.buffers.feats[:n].clone())
        return torch.cat(parts)

    def inputs(self, batch: int, frames: int) -> torch.Tensor:
        return torch.empty(batch, SUBSAMPLING * frames, N_MELS)  # `step` copies it into the shared buffer

    def step(self, feats: torch.Tensor, slots: list[int]) -> torch.Tensor:
        b, frames = feats.shape[0], feats.shape[1] // SUBSAMPLING
        if frames > MAX_GRAPH_FRAMES:  # several steps, exact (streaming equals offline)
            n = SUBSAMPLING * MAX_GRAPH_FRAMES
            return torch.cat([self.step(feats[:, i : i + n], slots) for i in range(0, feats.shape[1], n)], 1)
        self.buffers.step_in[:b, : feats.shape[1]].copy_(feats)
        self.buffers.slots[:b].copy_(torch.tensor(slots, dtype=torch.int64))
        self._ask(Step(b, frames))
        return self.buffers.step_out[:b, :frames].clone()

    def reset(self, slots: list[int]) -> None:
        self._ask(Reset(tuple(slots)))

    def _ask(self, request: Request) -> None:
        try:
            self.conn.send(request)
            error = self.conn.recv()
        except (EOFError, OSError) as e:
            raise StepProcessError(f"the step process is gone: {e!r}") from e
        if error is not None:
            raise StepProcessError(error)


@dataclass(frozen=True)
class StepSpec:
    """What `asr serve --step-process` asks for: the model, the device to run it on, its vocabulary size and the
    dtype to load it as."""

    model_dir: Path
    device: str
    vocab_size: int
    dtype: torch.dtype  # the model's (`asr serve --dtype`); the SSM state is float32 whatever it is


@dataclass(frozen=True)
class StepPlan:
    """What the step process needs: the model and device, and each worker's slots, pipe end and buffers."""

    spec: StepSpec
    slots_per_worker: int
    conns: list[Connection]
    buffers: list[SharedBuffers]


def run_step_process(plan: StepPlan, ready: Connection) -> None:
    """Process entry: load the model, capture the graphs, send `ready`, then serve until every worker hung up."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # the workers drain through us; we stop when they hang up
    torch.set_num_threads(STEP_THREADS)
    device = torch.device(plan.spec.device)
    model, _ = load_model(plan.spec.model_dir, device=device, dtype=plan.spec.dtype)
    compute = LocalCompute(model, plan.slots_per_worker * len(plan.conns), device)
    ready.send(True)
    ready.close()
    with torch.inference_mode():
        stats = _serve(compute, plan)
    print(f"step process: {stats}", file=sys.stderr, flush=True)


@dataclass
class StepStats:
    """What the step process did, printed when it ends."""

    rounds: int = 0
    requests: int = 0
    steps: int = 0
    rows: int = 0
    busy_s: float = 0.0
    features_s: float = 0.0
    steps_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def __str__(self) -> str:
        wall = time.perf_counter() - self.started
        per_round = self.requests / max(1, self.rounds)
        return (
            f"{self.rounds} rounds, {self.requests} requests ({per_round:.1f} a round), {self.steps} steps of "
            f"{self.rows / max(1, self.steps):.0f} streams on average; busy {self.busy_s:.1f} s of {wall:.1f} s "
            f"(features {self.features_s:.1f} s, steps {self.steps_s:.1f} s)"
        )


def _serve(compute: LocalCompute, plan: StepPlan) -> StepStats:
    """Answer requests until every worker has hung up: each round takes every request waiting and runs the
    resets, one features call and one step per frame count for all of them together."""
    stats = StepStats()
    open_conns = {conn: i for i, conn in enumerate(plan.conns)}
    while open_conns:
        requests: list[tuple[int, Request]] = []
        for conn in wait(list(open_conns)):
            try:
                requests.append((open_conns[conn], conn.recv()))
            except EOFError:
                del open_conns[conn]
        start = time.perf_counter()
        errors = _answer(compute, plan, requests, stats)
        for worker, _ in requests:
            try:
                plan.conns[worker].send(errors.get(worker))
            except OSError:  # the worker died while we worked for it; the others go on
                open_conns.pop(plan.conns[worker], None)
        stats.rounds += 1
        stats.requests += len(requests)
        stats.busy_s += time.perf_counter() - start
    return stats


def _answer(
    compute: LocalCompute, plan: StepPlan, requests: list[tuple[int, Request]], stats: StepStats | None = None
) -> dict[int, str]:
    """Run one round of requests; returns an error message by worker for the requests that failed."""
    stats = stats if stats is not None else StepStats()
    errors: dict[int, str] = {}
    feature_rows: list[tuple[int, int]] = []
    steps: dict[int, list[tuple[int, int]]] = defaultdict(list)  # frames -> [(worker, batch)]
    for worker, request in requests:
        if isinstance(request, Reset) and request.slots and all(0 <= s < plan.slots_per_worker for s in request.slots):
            compute.reset([worker * plan.slots_per_worker + s for s in request.slots])
        elif isinstance(request, Features) and 0 < request.rows <= WINDOW_ROWS:
            feature_rows.append((worker, request.rows))
        elif (
            isinstance(request, Step)
            and 0 < request.batch <= plan.slots_per_worker
            and 0 < request.frames <= MAX_GRAPH_FRAMES
        ):
            steps[request.frames].append((worker, request.batch))
        else:
            errors[worker] = f"bad request {request!r}"
    start = time.perf_counter()
    if feature_rows:
        windows = torch.cat([plan.buffers[w].windows[:n] for w, n in feature_rows])
        feats = compute.features(windows).cpu()
        for (w, n), f in zip(feature_rows, feats.split([n for _, n in feature_rows]), strict=True):
            plan.buffers[w].feats[:n].copy_(f)
    stats.features_s += time.perf_counter() - start
    start = time.perf_counter()
    for frames, batch in steps.items():
        _step(compute, plan, frames, batch)
        stats.steps += 1
        stats.rows += sum(b for _, b in batch)
    stats.steps_s += time.perf_counter() - start
    return errors


def _step(compute: LocalCompute, plan: StepPlan, frames: int, batch: list[tuple[int, int]]) -> None:
    """One batched step over the requests of several workers with the same frame count."""
    n = SUBSAMPLING * frames
    feats = torch.cat([plan.buffers[w].step_in[:b, :n] for w, b in batch])
    slots = torch.cat([plan.buffers[w].slots[:b] + w * plan.slots_per_worker for w, b in batch])
    log_probs = compute.step(feats, slots.tolist()).cpu()
    for (w, b), rows in zip(batch, log_probs.split([b for _, b in batch]), strict=True):
        plan.buffers[w].step_out[:b, :frames].copy_(rows)
