"""The half-precision step's two scan kernels in the whole graphed encoder step: `_step_scan_kernel` (frame by frame)
against `_step_ssd_kernel` (the chunked form on tensor cores), by `kernels/step.py`'s fixed settings (no
autotuning: the kernels write the state in place, so the settings are chosen by hand from this table).

A variant is MIN/ROWS/WARPS[/PROGRAMS/STAGES]: `_SSD_MIN_FRAMES` (the fewest frames a step that takes the chunked
form; 17 = never), `_SSD_ROWS` (state rows a tile), `_SSD_WARPS`, and optionally `_SSD_PROGRAMS_PER_SM` (persistent
programs an SM; 0 = a program a tile) and `_SSD_STAGES` (software pipelining across tiles); the defaults otherwise.
Each runs the graphed step of the default model (bf16 weights) at each BATCHxCHUNK configuration; the table gives the
median wall microseconds of `--steps` steps, and each variant runs `--rounds` times, interleaved with the others.

    python3 bench/step_ssd.py [--variants 17/32/2 8/32/2 8/32/2/0/1 8/32/2/6/3] [--configs 1024x8 1024x16]
"""

from __future__ import annotations

import argparse

import torch
from step_warps import median_us  # bench/step_warps.py, beside this script

import kernels.step
from asr.model import ASRModel, ModelDimensions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["17/32/2", "8/32/2", "8/32/2/0/1", "8/32/2/4/2"],
                   help="MIN/ROWS/WARPS[/PROGRAMS/STAGES]")  # fmt: skip
    p.add_argument("--configs", nargs="+", default=["64x8", "1024x4", "1024x8", "1024x16", "4096x16"],
                   help="BATCHxCHUNK")  # fmt: skip
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", torch.bfloat16)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    defaults = kernels.step._SSD_PROGRAMS_PER_SM, kernels.step._SSD_STAGES
    print(
        "| min frames / rows / warps [/ programs an SM / stages] | "
        + " | ".join(f"{b} x {c} (us)" for b, c in configs)
        + " |"
    )
    print("|---|" + "---:|" * len(configs))
    with torch.inference_mode():
        for _ in range(args.rounds):
            for variant in args.variants:
                frames, rows, warps, *persistent = (int(v) for v in variant.split("/"))
                kernels.step._SSD_MIN_FRAMES, kernels.step._SSD_ROWS, kernels.step._SSD_WARPS = frames, rows, warps
                kernels.step._SSD_PROGRAMS_PER_SM, kernels.step._SSD_STAGES = persistent or defaults
                row = [median_us(model, b, c, args.steps) for b, c in configs]
                print(f"| {variant} | " + " | ".join(f"{v:,.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
