"""A few eager fused streaming steps of the default-size model at one BATCHxCHUNK, for Nsight Compute to profile
their kernels (the kernels a CUDA graph replays), e.g.

    ncu --kernel-name _step_scan_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy python3 bench/ncu_step.py --batch 1024 --chunk 8
"""

from __future__ import annotations

import argparse

import torch

from asr.features import N_MELS
from asr.model import ASRModel, ModelDimensions
from asr.stepper import EncoderStepper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=8, help="encoder frames a step")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", torch.bfloat16)
    with torch.inference_mode():
        stepper = EncoderStepper(model, args.batch, "cuda", graphs=False)
        feats = torch.randn(args.batch, 4 * args.chunk, N_MELS, device="cuda")
        for _ in range(args.steps):
            stepper(feats, list(range(args.batch)))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
