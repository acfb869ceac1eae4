"""The Triton front end (`kernels/frontend.py`) alone, under each launch plan and conv-kernel warp count: GPU time of
one `frontend_step` call of the default model (bf16), for each BATCHxCHUNK and each variant, from a CUDA graph of
`--calls` calls timed by CUDA events (`bench/one_launch.py`'s `graphed_us`). A variant is PLAN/WARPS[/MIN_FRAMES]:
PLAN is "auto" (`plan`'s own choice) or N_CO:FT (n_co conv2 channel blocks x FT frames a conv program); WARPS sets
`_CONV_WARPS_MANY_STREAMS`, the conv kernel's warps from B >= SMs streams (one program a stream); MIN_FRAMES sets
`asr.model.FRONTEND_KERNEL_MIN_FRAMES`, from how many encoder frames a step the model takes these kernels instead of
cuDNN. `--step` also times the whole graphed encoder step (`bench/step_warps.py`'s `median_us`) under each variant.

    python3 bench/frontend_plan.py [--configs 1024x8 256x4] [--variants auto/4 auto/8 1:2/8 auto/8/1024] [--step]
"""

from __future__ import annotations

import argparse
import functools

import torch
from one_launch import graphed_us  # bench/one_launch.py, beside this script
from step_warps import median_us  # bench/step_warps.py, beside this script

import asr.model
import kernels.frontend
from asr.features import N_MELS
from asr.model import ASRModel, ModelDimensions


def call_us(model: ASRModel, batch: int, chunk: int, calls: int, replays: int) -> float:
    """Median GPU microseconds of one front-end call of (batch, 4 chunk, n_mels) features."""
    fe = model.frontend
    pool = model.init_state(batch, "cuda").frontend
    feats = torch.randn(batch, 4 * chunk, N_MELS, device="cuda")
    slots = torch.arange(batch, device="cuda")
    args = (pool.conv1, pool.conv2, slots, model.cmvn_mean, model.cmvn_istd, fe.conv1.weight, fe.conv1.bias,
            fe.conv2.weight, fe.conv2.bias, fe.out.weight, fe.out.bias)  # fmt: skip
    return graphed_us(lambda: kernels.frontend.frontend_step(feats, *args, check=False), calls, replays)


def set_variant(variant: str, auto_plan, default_min_frames: int) -> None:
    """Point kernels.frontend at the variant's plan and whole-stream warp count, and the model at its threshold."""
    name, warps, *min_frames = variant.split("/")
    kernels.frontend._CONV_WARPS_MANY_STREAMS = int(warps)
    asr.model.FRONTEND_KERNEL_MIN_FRAMES = int(min_frames[0]) if min_frames else default_min_frames
    if name == "auto":
        kernels.frontend.plan = auto_plan
    else:
        n_co, ft = (int(v) for v in name.split(":"))
        kernels.frontend.plan = functools.partial(auto_plan, co_splits=n_co, frames_per_program=ft)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["256x4", "1024x1", "1024x8", "4096x8"], help="BATCHxCHUNK")
    p.add_argument("--variants", nargs="+", default=["auto/4", "auto/8", "1:2/8"], help="PLAN/WARPS[/MIN_FRAMES]")
    p.add_argument("--step", action="store_true", help="also time the whole graphed encoder step")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--replays", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", torch.bfloat16)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    auto_plan, default_min_frames = kernels.frontend.plan, asr.model.FRONTEND_KERNEL_MIN_FRAMES
    what = ["front end"] + (["whole step"] if args.step else [])
    print("| variant | " + " | ".join(f"{b} x {c}, {w} (us)" for w in what for b, c in configs) + " |")
    print("|---|" + "---|" * len(configs) * len(what))
    with torch.inference_mode():
        for variant in args.variants:
            set_variant(variant, auto_plan, default_min_frames)
            row = [call_us(model, b, c, args.calls, args.replays) for b, c in configs]
            if args.step:
                row += [median_us(model, b, c, 30) for b, c in configs]
            print(f"| {variant} | " + " | ".join(f"{v:,.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
