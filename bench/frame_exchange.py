"""GPU time of the one-frame launch (`kernels/frame_step.py`) by how its out_proj exchange is laid out: the number of
accumulator rows a layer (`_COPIES`, program q adding into row q % _COPIES) and where those rows lie (each copy of
all rows apart, as `_acc_strides` lays them out, or a layer's copies side by side), with the workspace kept across
calls (no memset) or fresh each call (a memset a call, as before).

    source scripts/device_env.sh && python3 bench/frame_exchange.py [--rows 1 2 4] [--copies 1 2 4 8]

Default model (`ModelDimensions()`), random bf16 weights (`--dtype`), from raw log-mel to log-probs. Each variant
loads its own copy of the module (Triton compiles a kernel once per value of its globals), checks one call against
`frame_step_ref` (relative error of the log-probs, which must be under 2e-2 in bf16 or 1e-4 in float32) and that
the kept workspace is zero after it, then times `--calls` consecutive calls captured in one CUDA graph: median GPU
us a call over `--replays` replays.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import torch
import triton.language as tl
from one_launch import graphed_us  # bench/one_launch.py, beside this script

import kernels.frame_step
from asr.features import N_MELS
from asr.model import ASRModel, EncoderState, ModelDimensions
from kernels.encoder_step import stacked_pool


def load(name: str, path: str | Path) -> ModuleType:
    """A fresh module from `path` under `name` of its own (Triton compiles each module's kernel apart)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def variant(copies: int, side_by_side: bool) -> ModuleType:
    """A fresh copy of kernels/frame_step.py with `copies` accumulator rows a layer, laid out side by side (a layer's
    copies together) or copy by copy (the module's `_acc_strides`)."""
    mod = load(f"frame_step_{copies}_{side_by_side}", kernels.frame_step.__file__)
    mod._COPIES = tl.constexpr(copies)
    if side_by_side:
        mod._acc_strides = lambda streams, w: (copies * mod._acc_row(w), mod._acc_row(w))
    return mod


def frame_pools(state: EncoderState) -> tuple[torch.Tensor, ...]:
    """frame_step's pools of `state`: the front end's conv1 and conv2 caches, the layers' stacked conv and ssm."""
    layers = state.layers
    conv, ssm = stacked_pool([s.conv for s in layers]), stacked_pool([s.ssm for s in layers])
    return state.frontend.conv1, state.frontend.conv2, conv, ssm


def measure(mod: ModuleType, model: ASRModel, b: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """(relative error against frame_step_ref, GPU us a call with a kept workspace, with a fresh one a call)."""
    w = model.encoder_weights()
    pools, ref_pools = frame_pools(model.init_state(64, "cuda")), frame_pools(model.init_state(64, "cuda"))
    slots = torch.arange(b, device="cuda") * 5
    feats = 3 * torch.randn(b, 4, N_MELS, device="cuda") - 8
    work = torch.zeros(mod.work_words(b, w), dtype=torch.int32, device="cuda")
    out = mod.frame_step(feats, w, *pools, slots, log_probs=True, work=work)
    expected = mod.frame_step_ref(feats, w, *ref_pools, slots, log_probs=True)
    if work.any():
        raise RuntimeError("the workspace is not zero after a call")
    error = ((out - expected).norm() / expected.norm()).item()
    kept = graphed_us(lambda: mod.frame_step(feats, w, *pools, slots, check=False, log_probs=True, work=work),
                      args.calls, args.replays)  # fmt: skip
    fresh = graphed_us(lambda: mod.frame_step(feats, w, *pools, slots, check=False, log_probs=True), args.calls,
                       args.replays)  # fmt: skip
    return error, kept, fresh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4], help="streams a launch")
    p.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", getattr(torch, args.dtype)).eval()
    bound = 2e-2 if args.dtype == "bfloat16" else 1e-4
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, 12 x 256, GPU us a call (graph of {args.calls} calls)\n")
    print("| streams | copies | layout | rel. error | kept workspace | fresh workspace (memset) |")
    print("|---:|---:|---|---:|---:|---:|")
    with torch.inference_mode():
        for copies in args.copies:
            for side_by_side in (False, True) if copies > 1 else (False,):
                mod = variant(copies, side_by_side)
                for b in args.rows:
                    error, kept, fresh = measure(mod, model, b, args)
                    flag = "" if error < bound else " FAILED"
                    layout = "side by side" if side_by_side else "copy by copy"
                    print(f"| {b} | {copies} | {layout} | {error:.1e}{flag} | {kept:.1f} | {fresh:.1f} |", flush=True)


if __name__ == "__main__":
    main()
