"""The streaming engine: a preallocated pool of per-stream state slots and one batcher per device.

The event loop only enqueues commands (audio, flush, close) on an `asyncio.Queue`. The batcher
awaits that queue, takes everything waiting, and runs the compute in its own worker thread:
resampling, features, then batched steps (`streaming.compute`: `asr.stepper.EncoderStepper` in this
process, the fused Triton step under CUDA graphs on CUDA and PyTorch on the CPU, or the step process
shared by all workers) over every stream that has a whole encoder frame ready, addressing each
stream's state by its slot in place, then greedy decoding; with a language model, each finished
segment is decoded again by its beam search (`asr.lm`), in a pool of worker processes
(`RescorePool`) so that the batcher never waits for it. Messages for clients go back to each
stream's asyncio queue through `loop.call_soon_threadsafe`, in order per stream: a stream's
results wait behind its finals still being decoded. Nothing polls.

Each stream runs exactly the path of `asr transcribe` (same resampler, features, model state and
decoder), so its finals equal the offline transcript; batching only adds float rounding.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from asr.audio import StreamingResampler
from asr.decoding import GreedyCTCDecoder, Segment, SegmenterConfig
from asr.features import ENCODER_FRAME_S, N_MELS, SUBSAMPLING, WINDOW_SAMPLES, Framer
from asr.lm import BeamSearch, LMError, RescoreJob, RescorePool, SegmentRescorer
from asr.model import ASRModel
from asr.stepper import MAX_GRAPH_FRAMES
from streaming.compute import Compute, LocalCompute
from streaming.protocol import StreamOptions

MAX_CHUNK_FRAMES = MAX_GRAPH_FRAMES  # encoder frames (640 ms) per batched step at most


class CapacityError(Exception):
    """Every state slot is taken."""


@dataclass
class Stream:
    """One client stream. The fields from `resampler` on belong to the batcher thread, which sets
    them up on the stream's first command (reset)."""

    id: str
    resume_token: str
    slot: int
    sample_rate: int
    options: StreamOptions
    emit: Callable[[Stream, list[Segment], Segment | None, bool], None]  # finals, partial, closed
    always_reply: bool = False  # Vosk: a reply (the current partial) after every processed command
    backlog: int = 0  # samples enqueued but not yet processed (event-loop side)
    on_drained: Callable[[], None] | None = None  # event-loop side: called as the backlog shrinks
    closed: bool = False
    resampler: StreamingResampler = field(init=False)
    framer: Framer = field(init=False)
    windows: list[torch.Tensor] = field(init=False)  # (T, WINDOW_SAMPLES) frames not yet through LogMel
    pending: torch.Tensor = field(init=False)  # feature frames not yet through the model
    decoder: GreedyCTCDecoder = field(init=False)
    last_partial: str = ""
    last_partial_frame: int = -(10**9)
    in_order: asyncio.Task | None = None  # event-loop side: the last delivery waiting for rescored finals

    def reset(self, device: torch.device, rescorer: SegmentRescorer | None) -> None:
        self.resampler = StreamingResampler(self.sample_rate)
        self.framer = Framer()
        self.windows = []
        self.pending = torch.zeros(0, N_MELS, device=device)
        seg = SegmenterConfig(pause_s=self.options.pause_s, max_segment_s=self.options.max_segment_s)
        self.decoder = GreedyCTCDecoder(config=seg, rescorer=rescorer)
        self.last_partial, self.last_partial_frame = "", -(10**9)


@dataclass(frozen=True)
class Command:
    stream: Stream
    kind: str  # audio | flush | close | reset | configure
    audio: np.ndarray | None = None
    options: StreamOptions | None = None


@dataclass
class EngineStats:
    """Read by /metrics. Updated by the batcher thread."""

    steps: int = 0
    last_batch: int = 0
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0


class Engine:
    """State pool + batcher for one model on one device."""

    def __init__(
        self,
        model: ASRModel,
        device: torch.device,
        max_streams: int,
        on_step: Callable[[float, int], None] | None = None,
        search: BeamSearch | None = None,
        token_prefix: str = "",
        rescore_processes: int = 2,
        compute: Compute | None = None,
    ) -> None:
        """`on_step(seconds, batch)` is called from the batcher thread after each model step. With
        `search`, finals are decoded again with its language model, in `rescore_processes` worker
        processes (0: in the batcher thread). Resume tokens start with `token_prefix` (a server
        worker's, so that any worker can tell whose stream it is). `compute` (default: `LocalCompute`
        of `model` on `device`) runs the features and the model steps."""
        self.model = model.eval()
        self.token_prefix = token_prefix
        self.search = search
        self.pool = RescorePool(search, rescore_processes) if search is not None and rescore_processes else None
        self.on_step = on_step
        self.max_streams = max_streams
        self.compute = compute if compute is not None else LocalCompute(model, max_streams, device)
        self.device = self.compute.device  # where features and log-probs come back
        self.free = list(range(max_streams - 1, -1, -1))
        self.streams: dict[str, Stream] = {}  # event-loop side: streams holding a slot
        self._live: dict[str, Stream] = {}  # batcher side: streams whose compute state is set up
        self.queue: asyncio.Queue[Command] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        self.stats = EngineStats()
        self._task: asyncio.Task | None = None
        self.failure: BaseException | None = None  # set if the batcher died; /healthz reports it

    # ------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")
        self._task.add_done_callback(self._on_exit)

    def _on_exit(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            logging.getLogger(__name__).error("batcher failed", exc_info=self.failure)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=True)
        if self.pool is not None:
            self.pool.shutdown()

    @property
    def active(self) -> int:
        return len(self.streams)

    def open(self, sample_rate: int, options: StreamOptions, emit, always_reply: bool = False) -> Stream:
        if not self.free:
            raise CapacityError(f"all {self.max_streams} stream slots are in use")
        slot = self.free.pop()
        token = self.token_prefix + secrets.token_urlsafe(16)
        stream = Stream(secrets.token_hex(8), token, slot, sample_rate, options, emit, always_reply)
        self.streams[stream.id] = stream
        self.submit(Command(stream, "reset"))  # the batcher builds its compute state and zeroes the slot
        return stream

    def submit(self, command: Command) -> None:
        if command.kind == "audio":
            command.stream.backlog += len(command.audio)
        self.queue.put_nowait(command)

    def release(self, stream: Stream) -> None:
        """Free the stream's slot (after its close was processed, or when it is abandoned). The
        stream is marked closed first, so commands still queued for it cannot touch the slot
        once another stream has it."""
        stream.closed = True
        if self.streams.pop(stream.id, None) is not None:
            self.free.append(stream.slot)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(self.executor, self._process, await self._take_all(), loop)

    async def _take_all(self) -> list[Command]:
        """Everything waiting, at least one command. (Not kept past the batch: a batch's audio is freed
        once it is processed, not when the next command arrives.)"""
        commands = [await self.queue.get()]
        while not self.queue.empty():
            commands.append(self.queue.get_nowait())
        return commands

    # ------------------------------------------------------------ batcher thread

    @torch.inference_mode()
    def _process(self, commands: list[Command], loop: asyncio.AbstractEventLoop) -> None:
        finals: dict[str, list[Segment]] = {}
        ends: list[Command] = []
        drained: dict[str, tuple[Stream, int]] = {}
        new = [cmd.stream for cmd in commands if cmd.kind == "reset"]
        if new:
            self.compute.reset([s.slot for s in new])  # one call for the tick's new streams
        for cmd in commands:
            s = cmd.stream
            if cmd.kind == "reset":
                s.reset(self.device, self._rescorer())
                self._live[s.id] = s
            elif cmd.kind == "audio" and not s.closed:
                self._accept(s, cmd.audio)
                drained[s.id] = (s, drained.get(s.id, (s, 0))[1] + len(cmd.audio))
            elif cmd.kind == "configure":
                s.options = cmd.options
                s.decoder.config = SegmenterConfig(pause_s=s.options.pause_s, max_segment_s=s.options.max_segment_s)
            elif cmd.kind in ("flush", "close"):
                ends.append(cmd)
        self._extract([s for s in self._live.values() if s.windows])
        self._run_model(finals)
        closing = list(
            {cmd.stream.id: cmd.stream for cmd in ends if cmd.kind == "close" and not cmd.stream.closed}.values()
        )
        self._finish(closing, finals)
        for cmd in ends:
            finals.setdefault(cmd.stream.id, []).extend(cmd.stream.decoder.flush())
        closed = {s.id for s in closing}
        deliveries = [(self._drained, s, n) for s, n in drained.values()]
        touched = {cmd.stream.id: cmd.stream for cmd in commands if cmd.kind != "reset"}
        for sid, s in touched.items():
            partial = None if sid in closed else (s.decoder.partial() if s.always_reply else self._partial(s))
            done = finals.get(sid, [])
            if done or partial is not None or sid in closed or s.always_reply:
                deliveries.append((self._emit_in_order, s, self._rescore(s, done), partial, sid in closed))
        loop.call_soon_threadsafe(_deliver, deliveries)  # one wake-up of the event loop per batch

    def _rescorer(self) -> SegmentRescorer | None:
        """A new stream's rescorer: none without an LM; decoding in place, or collecting jobs for the pool."""
        if self.search is None:
            return None
        return SegmentRescorer(None if self.pool is not None else self.search)

    def _rescore(self, s: Stream, finals: list[Segment]) -> list[Segment | tuple[RescoreJob, Future]]:
        """The finals, or with the pool, the job of each (the same segments, in the same order) and the
        future of its words."""
        if self.pool is None:
            return finals
        return [(job, self.pool.submit(job)) for job in s.decoder.rescorer.take_jobs()]

    # ------------------------------------------------------------ event-loop side, in order per stream

    def _emit_in_order(
        self, s: Stream, finals: list[Segment | tuple[RescoreJob, Future]], partial: Segment | None, closed: bool
    ) -> None:
        """Emit now, or after the stream's finals still being decoded, so that its messages keep their order."""
        waiting = s.in_order is not None and not s.in_order.done()
        if not waiting and all(isinstance(f, Segment) for f in finals):
            s.emit(s, finals, partial, closed)
            return
        s.in_order = asyncio.get_running_loop().create_task(self._emit_after(s.in_order, s, finals, partial, closed))

    async def _emit_after(self, previous: asyncio.Task | None, s: Stream, finals, partial, closed: bool) -> None:
        if previous is not None:
            await previous
        s.emit(s, [await self._rescored(f) for f in finals], partial, closed)

    async def _rescored(self, final: Segment | tuple[RescoreJob, Future]) -> Segment:
        if isinstance(final, Segment):
            return final
        job, future = final
        try:
            return job.result(await asyncio.wrap_future(future))
        except (LMError, RuntimeError) as e:  # e.g. BrokenProcessPool: the stream goes on with greedy's final
            logging.getLogger(__name__).error("language-model rescoring failed: %r", e)
            return job.segment

    def _drained(self, stream: Stream, n: int) -> None:
        stream.backlog -= n
        if stream.on_drained is not None:
            stream.on_drained()

    def _accept(self, s: Stream, samples: np.ndarray) -> None:
        """Resample and frame on the CPU; `_extract` computes the features of every stream at once."""
        s.windows.append(s.framer.accept(s.resampler.accept(torch.from_numpy(samples))))
        self.stats.audio_seconds += len(samples) / s.sample_rate

    def _extract(self, streams: list[Stream]) -> None:
        """Log-mel of all these streams' new frames in one call on the device (bit-identical to per stream)."""
        windows = torch.cat([w for s in streams for w in s.windows]) if streams else torch.zeros(0, WINDOW_SAMPLES)
        feats = self.compute.features(windows)
        counts = [sum(w.shape[0] for w in s.windows) for s in streams]
        for s, f in zip(streams, feats.split(counts), strict=True):
            s.pending = torch.cat([s.pending, f]) if s.pending.shape[0] else f
            s.windows = []

    def _run_model(self, finals: dict[str, list[Segment]]) -> None:
        """Step every stream with a whole encoder frame ready, batched, until none has one."""
        while True:
            for sid in [sid for sid, s in self._live.items() if s.closed]:
                del self._live[sid]
            ready = [s for s in self._live.values() if s.pending.shape[0] >= SUBSAMPLING]
            if not ready:
                return
            frames = min(MAX_CHUNK_FRAMES, *(s.pending.shape[0] // SUBSAMPLING for s in ready))
            n = frames * SUBSAMPLING
            # written straight into the step's input buffer (on CUDA the graph's own: no copy in the step)
            feats = torch.stack([s.pending[:n] for s in ready], out=self.compute.inputs(len(ready), frames))
            for s in ready:
                s.pending = s.pending[n:]
            for s, done in zip(ready, self._step(ready, feats), strict=True):
                finals.setdefault(s.id, []).extend(done)

    def _step(self, streams: list[Stream], feats: torch.Tensor) -> list[list[Segment]]:
        """One batched model step over the streams' slots, in place; feeds each stream's decoder the batch's
        argmax (one transfer from the device; with an LM, of the whole log-probs, which its rescorers keep)
        and returns the segments each completed."""
        start = time.perf_counter()
        log_probs = self.compute.step(feats, [s.slot for s in streams])
        if self.search is not None:
            rows = log_probs.float().cpu()
            best_logp, best = rows.max(dim=-1)
            probs, tokens = best_logp.exp(), best
        else:
            best_logp, best = log_probs.max(dim=-1)
            probs, tokens = torch.stack([best_logp.exp(), best.float()]).cpu()  # token ids < 2^24 are exact
            rows = [None] * len(streams)
        done = [
            s.decoder.feed_best(p, t, lp)
            for s, p, t, lp in zip(streams, probs.tolist(), tokens.int().tolist(), rows, strict=True)
        ]
        elapsed = time.perf_counter() - start
        self.stats.steps += 1
        self.stats.last_batch = len(streams)
        self.stats.compute_seconds += elapsed
        if self.on_step is not None:
            self.on_step(elapsed, len(streams))
        return done

    def _finish(self, streams: list[Stream], finals: dict[str, list[Segment]]) -> None:
        """Close: run each stream's last samples, padded as `asr transcribe` pads them, so every sample is
        covered by a final; the closing streams' last partial frames go in one batched step."""
        for s in streams:
            s.windows.append(s.framer.accept(s.resampler.flush()))
        self._extract([s for s in streams if s.windows])
        self._run_model(finals)  # whole frames the flushed resampler completed
        tails = [s for s in streams if s.pending.shape[0]]  # fewer than SUBSAMPLING frames each
        if tails:
            feats = torch.cat([self.model.pad_features(s.pending.unsqueeze(0)) for s in tails])
            for s, done in zip(tails, self._step(tails, feats), strict=True):
                finals.setdefault(s.id, []).extend(done)
                s.pending = s.pending[:0]
        for s in streams:
            s.closed = True

    def _partial(self, s: Stream) -> Segment | None:
        """The segment in progress, if its text changed and the partial interval has passed."""
        interval = round(s.options.partial_interval_s / ENCODER_FRAME_S)
        if s.decoder.frame - s.last_partial_frame < interval:
            return None
        seg = s.decoder.partial()
        text = seg.text if seg is not None else ""
        if text == s.last_partial:
            return None
        s.last_partial, s.last_partial_frame = text, s.decoder.frame
        return seg


def _deliver(calls: list[tuple]) -> None:
    """On the event loop: run a batch's callbacks (fn, *args) in order."""
    for fn, *args in calls:
        fn(*args)
