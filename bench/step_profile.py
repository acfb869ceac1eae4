"""Where a streaming step's GPU time goes: torch.profiler over the eager fused step (the kernels a CUDA graph
replays), top kernels by CUDA time, for a few (batch, chunk) configurations of the default model.

    python3 bench/step_profile.py [--batches 1 1024] [--chunks 1 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from asr.features import N_MELS
from asr.model import ASRModel, ModelDimensions
from asr.stepper import EncoderStepper


def profile_step(batch: int, chunk: int, dtype: torch.dtype, steps: int) -> str:
    """The top-15 CUDA kernels over `steps` eager fused steps of (batch, 4 chunk, n_mels) features."""
    model = ASRModel(ModelDimensions()).to("cuda", dtype)
    stepper = EncoderStepper(model, batch, "cuda", graphs=False)
    feats = torch.randn(batch, 4 * chunk, N_MELS, device="cuda")
    slots = list(range(batch))
    for _ in range(3):
        stepper(feats, slots)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            stepper(feats, slots)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 1024])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.inference_mode():
        for b in args.batches:
            for c in args.chunks:
                print(f"\n## batch {b}, chunk {c}, {args.steps} steps, {args.dtype}\n")
                print(profile_step(b, c, getattr(torch, args.dtype), args.steps))


if __name__ == "__main__":
    main()
