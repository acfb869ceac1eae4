"""How the fused step's scan kernel scales with its warp count: whole-encoder step latency under CUDA graphs
for each `num_warps` of `_step_scan_kernel` (no autotuning in the kernel itself: it writes state in place).

    python3 bench/step_warps.py [--warps 1 2 4 8] [--configs 1x1 64x4 1024x1 1024x4]
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
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--configs", nargs="+", default=["1x1", "64x4", "1024x1", "1024x4"], help="BATCHxCHUNK")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", torch.bfloat16)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    print("| scan kernel warps | " + " | ".join(f"batch {b} chunk {c} (us)" for b, c in configs) + " |")
    print("|---|" + "---|" * len(configs))
    with torch.inference_mode():
        for w in args.warps:
            kernels.step._NUM_WARPS = w
            row = [median_us(model, b, c, args.steps) for b, c in configs]
            print(f"| {w} | " + " | ".join(f"{v:,.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
