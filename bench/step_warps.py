"""How the fused step's scan kernel scales with its launch settings: whole-encoder step latency under CUDA graphs
for each variant of `_step_scan_kernel`'s fixed settings in `kernels/step.py` (no autotuning in the kernel itself:
it writes state in place, so the settings are chosen by hand from this table).

A variant is ROWS/WARPS: state rows per program (`_SCAN_ROWS`) and num_warps (`_SCAN_WARPS`). Each runs the graphed
step of the default model (bf16 weights) at each BATCHxCHUNK configuration; the table gives the median
microseconds of `--steps` steps.

    python3 bench/step_warps.py [--variants 16/2 32/4 64/2 ...] [--configs 1x1 64x4 1024x1 1024x8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kernels.step
from asr.features import N_MELS
from asr.model import ASRModel, ModelDimensions
from asr.stepper import EncoderStepper


def median_us(model: ASRModel, batch: int, chunk: int, steps: int) -> float:
    """Median wall time of one graphed step of (batch, 4 chunk, n_mels) features, in microseconds."""
    stepper = EncoderStepper(model, batch, "cuda")
    feats = torch.randn(batch, 4 * chunk, N_MELS, device="cuda")
    slots = list(range(batch))
    for _ in range(5):
        stepper(feats, slots)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        stepper(feats, slots)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["16/1", "16/2", "32/2", "32/4", "64/2"], help="ROWS/WARPS")
    p.add_argument("--configs", nargs="+", default=["1x1", "64x4", "1024x1", "1024x8"], help="BATCHxCHUNK")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", torch.bfloat16)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    print("| state rows / warps | " + " | ".join(f"batch {b} chunk {c} (us)" for b, c in configs) + " |")
    print("|---|" + "---|" * len(configs))
    with torch.inference_mode():
        for variant in args.variants:
            rows, warps = variant.split("/")
            kernels.step._SCAN_ROWS, kernels.step._SCAN_WARPS = int(rows), int(warps)
            row = [median_us(model, b, c, args.steps) for b, c in configs]
            print(f"| {variant} | " + " | ".join(f"{v:,.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
