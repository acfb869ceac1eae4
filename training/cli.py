"""`asr train` and `python -m training` (the same command; torchrun launches the latter)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from asr.checkpoint import ModelLoadError
from asr.data import DataError
from training.config import ConfigError, load_config

DESCRIPTION = (
    "Train the CTC model from a TOML config (see configs/default.toml). One device: `asr train --config F`. "
    "Several GPUs: `torchrun --nproc-per-node N -m training --config F` (multi-node: add torchrun's own "
    "--nnodes/--rdzv-* arguments). Writes RUN/metrics.csv, RUN/tb (TensorBoard), RUN/ckpt-* (last K) and "
    "RUN/best (by dev WER). SIGTERM or Ctrl-C saves a checkpoint and stops; --resume continues exactly."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="TOML training config")
    p.add_argument("--resume", type=Path, help="run folder (its newest checkpoint) or one ckpt-* folder")
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="MODEL_DIR",
        help="start from this model directory's weights and CMVN (fine-tuning; a fresh optimizer and schedule); "
        "used when --resume is absent or finds no checkpoint yet (so one command both starts and resumes a run)",
    )
    p.add_argument("--until-step", type=int, help="stop at this step with a checkpoint (the schedule is unchanged)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from training.loop import train

    try:
        cfg = load_config(args.config)
        result = train(
            cfg, resume=args.resume, progress=not args.quiet, until_step=args.until_step, init_from=args.init_from
        )
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"asr train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = "n/a" if result.best_wer == float("inf") else f"{100 * result.best_wer:.2f}%"
    print(f"stopped at step {result.step}; best dev WER {best}; last checkpoint {result.last_checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
