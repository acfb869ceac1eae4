"""The half-precision step's two scan kernels in the whole graphed encoder step: `_step_scan_kernel` (frame by frame)
against `_step_ssd_kernel` (the chunked form on tensor cores), by `kernels/step.py`'s fixed settings (no
autotuning: the kernels write the state in place, so the settings are chosen by hand from this table).

A variant is MIN/ROWS/WARPS: `_SSD_MIN_FRAMES` (the fewest frames a step that takes the chunked form; 17 = never),
`_SSD_ROWS` (state rows per program) and `_SSD_WARPS`. Each runs the graphed step of the default model (bf16
weights) at each BATCHxCHUNK configuration; the table gives the median wall microseconds of `--steps` steps, and
each variant runs `--rounds` times, interleaved with the others.

    python3 bench/step_ssd.py [--variants 17/32/2 8/32/2 8/64/4] [--configs 1024x8 1024x16] [--rounds 2]
"""

from __future__ import annotations

import argparse

import torch
from step_warps import median_us  # bench/step_warps.py, beside this script

import kernels.step
from asr.model import ASRModel, ModelDimensions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["17/32/2", "8/32/2", "8/64/4", "8/16/1"], help="MIN/ROWS/WARPS")
    p.add_argument("--configs", nargs="+", default=["64x8", "1024x4", "1024x8", "1024x16", "4096x16"],
                   help="BATCHxCHUNK")  # fmt: skip
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", torch.bfloat16)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    print("| min frames / rows / warps | " + " | ".join(f"{b} x {c} (us)" for b, c in configs) + " |")
    print("|---|" + "---:|" * len(configs))
    with torch.inference_mode():
        for _ in range(args.rounds):
            for variant in args.variants:
                frames, rows, warps = (int(v) for v in variant.split("/"))
                kernels.step._SSD_MIN_FRAMES, kernels.step._SSD_ROWS, kernels.step._SSD_WARPS = frames, rows, warps
                row = [median_us(model, b, c, args.steps) for b, c in configs]
                print(f"| {variant} | " + " | ".join(f"{v:,.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
