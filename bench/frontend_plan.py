"""The Triton front end (`kernels/frontend.py`) alone, under each launch plan: GPU time of one `frontend_step` call
of the default model (bf16), for each BATCHxCHUNK and each plan (n_co conv2 channel blocks x FT frames a conv
program; "auto" is `plan`'s own choice), from a CUDA graph of `--calls` calls timed by CUDA events.

    python3 bench/frontend_plan.py [--configs 1024x8 256x4] [--plans auto 1/8 1/2 2/2]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

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
    for _ in range(2):
        kernels.frontend.frontend_step(feats, *args, check=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            kernels.frontend.frontend_step(feats, *args, check=False)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["256x4", "1024x1", "1024x8", "4096x8"], help="BATCHxCHUNK")
    p.add_argument("--plans", nargs="+", default=["auto", "1/1", "1/2", "1/4", "2/2"], help="auto or N_CO/FT")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--replays", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", torch.bfloat16)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    auto = kernels.frontend.plan
    print("| plan (n_co / FT) | " + " | ".join(f"{b} x {c} (us)" for b, c in configs) + " |")
    print("|---|" + "---|" * len(configs))
    with torch.inference_mode():
        for name in args.plans:
            if name == "auto":
                kernels.frontend.plan = auto
            else:
                n_co, ft = (int(v) for v in name.split("/"))
                kernels.frontend.plan = functools.partial(auto, co_splits=n_co, frames_per_program=ft)
            row = [call_us(model, b, c, args.calls, args.replays) for b, c in configs]
            print(f"| {name} | " + " | ".join(f"{v:,.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
