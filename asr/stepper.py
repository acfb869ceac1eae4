"""Step any subset of a pool of streams through the whole encoder; under CUDA graphs on CUDA.

`EncoderStepper` owns the state pool (`ASRModel.init_state(capacity + 1)`, allocated once) and turns
(features, slots) into log-probabilities. On CUDA it captures one graph per (batch bucket, frames): the
batch is padded up to a power of two and each pad row steps the spare slot `capacity`, which no stream
owns and nothing reads. A capture runs the step twice on a side stream first (compiling the Triton
kernels and warming cuBLAS), with every row on the spare slot, so no stream's state moves. Replays
copy the inputs into the graph's static buffers; chunks longer than `MAX_GRAPH_FRAMES` run as several
replays, which is exact (streaming equals offline). A one-frame graph of few streams is a single kernel
(`kernels/frame_step.py`, log-softmax included): its workspace is the graph's, kept zeroed by the kernel.

Shapes: B streams, L encoder frames, T = 4 L feature frames, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from asr.features import N_MELS, SUBSAMPLING
from asr.model import ASRModel, EncoderState, Impl
from kernels import encoder_step, frame_step
from kernels.step import MAX_FRAMES as MAX_GRAPH_FRAMES


@dataclass
class _Graph:
    """One captured step: replay after filling `feats` and `slots`; the result lands in `log_probs`."""

    graph: torch.cuda.CUDAGraph
    feats: torch.Tensor  # (bucket, 4 * frames, n_mels) float32, static input
    slots: torch.Tensor  # (bucket,) int64, static input
    log_probs: torch.Tensor  # (bucket, frames, V) float32, static output
    filled: tuple[int, ...]  # what `slots` holds now
    # the one-frame launch's workspace (zero between replays), if the step is that launch: the graph holds its
    # address, so this reference keeps its memory from being reused while the graph lives
    work: torch.Tensor | None


def bucket(n: int) -> int:
    """The batch size a graph is captured for: the next power of two >= n."""
    return 1 << (n - 1).bit_length()


class EncoderStepper:
    """The state pool of up to `capacity` streams and the batched step over any subset of them.

    `graphs` (default: on CUDA) replays captured CUDA graphs; otherwise each call runs `model.chunk` eagerly.
    `fused=False` uses the pure-PyTorch layers (the reference) instead of the Triton step kernels. On CUDA the
    stepper keeps a stacked copy of the weights (`model.encoder_weights()`, taken here: build a new stepper after
    changing the model) for the one-launch step of few streams (`kernels/frame_step.py`: the whole model for one
    frame; `kernels/encoder_step.py`: the layers and head for more). The model is put in eval mode.
    """

    def __init__(
        self,
        model: ASRModel,
        capacity: int,
        device: torch.device | str,
        graphs: bool | None = None,
        fused: bool = True,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.model = model.eval()
        self.device = torch.device(device)
        self.capacity = capacity
        self.impl = None if fused else Impl.TORCH  # None: the model's choice
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        with torch.inference_mode():
            self.pool: EncoderState = model.init_state(capacity + 1, self.device)  # + the spare slot for pad rows
        # the one-launch encoder step for few streams (a snapshot of the weights, taken once)
        self.weights = model.encoder_weights() if fused and self.device.type == "cuda" else None
        self.spare = capacity
        self._captured: dict[tuple[int, int], _Graph] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.graphs else None

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(batch bucket, frames) of every graph captured so far."""
        return sorted(self._captured)

    def reset(self, slots: Sequence[int]) -> None:
        """Zero these slots' state: the start of new streams."""
        self._check_slots(slots)
        rows = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            for t in self.pool.tensors():
                t.index_fill_(0, rows, 0)

    @torch.inference_mode()
    def __call__(self, feats: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """feats (B, 4 L, n_mels) raw log-mel of the streams in `slots` (B distinct) -> log-probs (B, L, V) float32
        on the device, advancing those slots. Under graphs the result is a view that the next call overwrites."""
        self._check_slots(slots)
        if feats.dim() != 3 or feats.shape[0] != len(slots) or feats.shape[2] != N_MELS:
            raise ValueError(f"feats must be ({len(slots)}, 4 L, {N_MELS}), got {tuple(feats.shape)}")
        if feats.shape[1] % SUBSAMPLING:
            raise ValueError(f"feats must hold a multiple of {SUBSAMPLING} frames, got {feats.shape[1]}")
        feats = feats.to(self.device, torch.float32)
        if not self.graphs:
            rows = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
            return self._eager(feats, rows, check=False)
        step = SUBSAMPLING * MAX_GRAPH_FRAMES
        if feats.shape[1] <= step:
            return self._replay(feats, slots)
        # a replay's output is the graph's static buffer, which the next replay of that graph overwrites: copy
        parts = [self._replay(feats[:, i : i + step], slots).clone() for i in range(0, feats.shape[1], step)]
        return torch.cat(parts, dim=1)

    def inputs(self, batch: int, frames: int) -> torch.Tensor:
        """A device buffer (batch, 4 frames, n_mels) float32 for the features of a call of `batch` streams by
        `frames` frames: under graphs (frames <= MAX_GRAPH_FRAMES) the graph's own static input, captured now if
        it was not, so that a caller who writes the features there (`torch.stack(..., out=)`) and passes the
        buffer saves the call's copy; else a new tensor. The next call of that shape overwrites it."""
        if batch <= 0 or frames <= 0:
            raise ValueError(f"batch and frames must be positive, got {batch} and {frames}")
        if batch > self.capacity:
            raise ValueError(f"batch must be at most the capacity {self.capacity}, got {batch}")
        if not self.graphs or frames > MAX_GRAPH_FRAMES:
            return torch.empty(batch, SUBSAMPLING * frames, N_MELS, device=self.device)
        with torch.inference_mode():
            return self._graph(bucket(batch), frames).feats[:batch]

    def warmup(self, frames: Sequence[int], batches: Sequence[int] | None = None, progress: bool | None = None) -> None:
        """Capture the graphs for these frame counts and batch sizes (default: every bucket up to the capacity)
        now, rather than on first use (a capture stalls every stream). On a machine whose Triton cache
        (~/.triton/cache) is empty, the first capture of each frame count took 11-20 s on an H100, by inference
        Triton's compile (BENCHMARKS.md, session 18). `progress` shows a bar on stderr (default: when stderr is a
        terminal)."""
        if not self.graphs:
            return
        sizes = sorted({bucket(b) for b in (batches if batches is not None else range(1, self.capacity + 1))})
        keys = [(size, f) for size in sizes for f in frames if (size, f) not in self._captured]
        bar = tqdm(keys, desc="capturing CUDA graphs", unit="graph", disable=None if progress is None else not progress)
        with torch.inference_mode():
            for size, f in bar:
                self._graph(size, f)

    # ------------------------------------------------------------ internals

    def _check_slots(self, slots: Sequence[int]) -> None:
        if not slots:
            raise ValueError("no slots given")
        if len(set(slots)) != len(slots) or min(slots) < 0 or max(slots) >= self.capacity:
            raise ValueError(f"slots must be distinct and in [0, {self.capacity}), got {list(slots)}")

    def _eager(
        self, feats: torch.Tensor, rows: torch.Tensor, check: bool, work: torch.Tensor | None = None
    ) -> torch.Tensor:
        log_probs, _ = self.model.chunk(
            feats, self.pool, rows, impl=self.impl, check=check, weights=self.weights, log_probs=True, work=work
        )
        return log_probs

    def _frame_work(self, size: int, frames: int) -> torch.Tensor | None:
        """A zeroed workspace for a graph of `size` rows by `frames` frames, if its step may be the one-frame launch."""
        if self.weights is None or frames != 1 or size > encoder_step.max_streams(self.weights, self.device):
            return None
        return torch.zeros(frame_step.work_words(size, self.weights), dtype=torch.int32, device=self.device)

    def _replay(self, feats: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        b, frames = feats.shape[0], feats.shape[1] // SUBSAMPLING
        g = self._graph(bucket(b), frames)
        full = b == g.feats.shape[0]  # no pad rows: no views to make (host time on the batch-1 path)
        if feats.data_ptr() != g.feats.data_ptr():  # else the caller wrote them there (`inputs`)
            (g.feats if full else g.feats[:b]).copy_(feats)
        filled = tuple(slots) + (self.spare,) * (g.slots.shape[0] - b)
        if filled != g.filled:  # streams step the same slots chunk after chunk: skip the host-to-device copy then
            g.slots.copy_(torch.tensor(filled, dtype=torch.int64))
            g.filled = filled
        g.graph.replay()
        return g.log_probs if full else g.log_probs[:b]

    def _graph(self, size: int, frames: int) -> _Graph:
        key = (size, frames)
        if key not in self._captured:
            self._captured[key] = self._capture(size, frames)
        return self._captured[key]

    def _capture(self, size: int, frames: int) -> _Graph:
        with torch.inference_mode(False):  # a plain tensor: `inputs` hands it out, to be written anywhere
            feats = torch.zeros(size, SUBSAMPLING * frames, N_MELS, device=self.device)
        slots = torch.full((size,), self.spare, dtype=torch.int64, device=self.device)
        work = self._frame_work(size, frames)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile and warm up; every row steps the spare slot
                self._eager(feats, slots, False, work)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            log_probs = self._eager(feats, slots, False, work)
        return _Graph(graph, feats, slots, log_probs, filled=(self.spare,) * size, work=work)
