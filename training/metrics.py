"""Training metrics: model FLOPs (for MFU), and a logger writing CSV and TensorBoard."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from asr.features import ENCODER_FRAME_S, N_MELS
from asr.model import ModelDimensions
from asr.ssm import SCAN_CHUNK


def forward_flops_per_second_of_audio(d: ModelDimensions) -> float:
    """Forward FLOPs (2 per multiply-add) for one second of audio: projections, front-end
    convs and the chunked scan. Training costs about 3x this (forward + backward)."""
    c = d.frontend_channels
    bins1, bins2 = math.ceil(N_MELS / 2), math.ceil(N_MELS / 4)
    frontend = 2 * 9 * c * bins1 * 2 + 2 * 9 * c * c * bins2 + 2 * c * bins2 * d.d_model  # per encoder frame
    d_in_proj = 2 * d.d_inner + 2 * d.n_groups * d.d_state + d.n_heads
    proj = 2 * d.d_model * d_in_proj + 2 * d.d_inner * d.d_model + 2 * d.conv_dim * d.d_conv
    # Chunked scan per frame: C.B scores (chunk x n per group), then per head scores @ x
    # (chunk x p), the chunk state (p x n) and the entering state's output (p x n).
    scan = 2 * (
        d.n_groups * SCAN_CHUNK * d.d_state + d.n_heads * (SCAN_CHUNK * d.head_dim + 2 * d.head_dim * d.d_state)
    )
    per_frame = frontend + d.n_layers * (proj + scan) + 2 * d.d_model * d.vocab_size
    return per_frame / ENCODER_FRAME_S


@dataclass
class Row:
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    audio_s_per_s: float  # training throughput, audio seconds per wall second
    mfu: float  # model FLOPs utilisation, 0..1 (0 on the CPU)
    dev_wer: float | None = None
    elapsed_s: float = 0.0


class MetricsLogger:
    """Appends rows to RUN/metrics.csv and writes the same scalars to RUN/tb for TensorBoard."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.csv"
        self.columns = [f.name for f in fields(Row)]
        if not self.path.is_file():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: Row) -> None:
        values = [getattr(row, c) for c in self.columns]
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(["" if v is None else v for v in values])
        for name in self.columns:
            value = getattr(row, name)
            if name not in ("step", "epoch") and value is not None:
                self.tb.add_scalar(name, value, row.step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
