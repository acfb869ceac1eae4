"""Where the two-launch block kernels (`kernels/block_step.py`) beat the general step kernels: whole-encoder step
latency under CUDA graphs, both ways, at each BATCHxCHUNK configuration and weight dtype.

`asr.model.BLOCK_STEP_MAX_STREAMS` picks the path by batch size; this table is how it was chosen. Each cell is the
median microseconds of `--steps` graphed steps of the default model (random weights).

    python3 bench/block_step.py [--configs 1x1 1x8 8x1 16x4 64x1 ...] [--dtypes bfloat16 float32]
"""

from __future__ import annotations

import argparse

import torch

import asr.model
from asr.model import ASRModel, ModelDimensions
from bench.step_warps import median_us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["1x1", "1x4", "1x8", "4x1", "8x1", "8x4", "16x1", "16x4", "32x1",
                                                    "64x1", "64x4"], help="BATCHxCHUNK")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    print("| weights | batch x chunk | general kernels (us) | block kernels (us) | block / general |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for dtype in args.dtypes:
            torch.manual_seed(0)
            model = ASRModel(ModelDimensions()).to("cuda", getattr(torch, dtype))
            for b, c in configs:
                asr.model.BLOCK_STEP_MAX_STREAMS = 0
                general = median_us(model, b, c, args.steps)
                asr.model.BLOCK_STEP_MAX_STREAMS = b
                block = median_us(model, b, c, args.steps)
                print(f"| {dtype} | {b} x {c} | {general:,.1f} | {block:,.1f} | {block / general:.2f} |", flush=True)


if __name__ == "__main__":
    main()
