"""`asr plot RUN_DIR`: training curves from RUN_DIR/metrics.csv to a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from training.metrics import read_metrics  # noqa: E402

PANELS = (
    ("loss", "CTC loss", "log"),
    ("dev_wer", "dev WER", "linear"),
    ("lr", "learning rate", "linear"),
    ("grad_norm", "grad norm (before clipping)", "log"),
    ("audio_s_per_s", "throughput (audio s / s)", "linear"),
    ("mfu", "MFU", "linear"),
)


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.csv'} has no rows yet")
    fig, axes = plt.subplots(3, 2, figsize=(11, 9), constrained_layout=True)
    for ax, (key, title, scale) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "dev_wer" else None, markersize=3)
            ax.set_yscale(scale if all(v > 0 for _, v in points) else "linear")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
