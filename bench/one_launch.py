"""GPU time of the model from raw log-mel to logits for few streams: the one-launch step as `ASRModel` takes it (for
one frame the whole model in one launch, `kernels/frame_step.py`; else the Triton front end, then the tl.dot form,
`kernels/encoder_step.py`), the front end and the tl.dot form, and the front end and the per-layer fused step
(`kernels/step.py` + `kernels/norm.py` + cuBLAS), each captured in a CUDA graph of `--calls` consecutive calls and
timed by CUDA events over `--replays` replays (us a call: no host time).
Then the whole `EncoderStepper` step (front end, layers, head, log-softmax; graphed), by the path the stepper takes
and by the per-layer path, each as GPU time between CUDA events around the call and as wall time.

    source scripts/device_env.sh && python3 bench/one_launch.py [--rows 1x1 1x4 4x1 16x1] [--block-p 16 32]

Default model (`ModelDimensions()`), random weights in bfloat16 (`--dtype`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import kernels.encoder_step as encoder_step
from asr.features import N_MELS
from asr.model import ASRModel, Impl, ModelDimensions
from asr.stepper import EncoderStepper


def graphed_us(fn: Callable[[], object], calls: int, replays: int) -> float:
    """Median GPU us a call of fn, captured `calls` times in one CUDA graph (after two warm-up calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def model_paths(model: ASRModel, b: int, l: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """(one-launch us as the stepper takes it, the tl.dot form's us, per-layer us) for raw log-mel (b, 4 l, n_mels)
    -> logits. For one frame the stepper takes the whole model in one launch (`kernels/frame_step.py`); else, and in
    the other two columns, the Triton front end first, then the tl.dot form (`kernels/encoder_step.py`) or the
    per-layer step."""
    state = model.init_state(64, "cuda")
    rows = torch.arange(b, device="cuda") * 3
    feats = torch.randn(b, 4 * l, N_MELS, device="cuda")
    w = model.encoder_weights()

    def front() -> torch.Tensor:
        return model.frontend.step(feats, state.frontend, rows, model.cmvn_mean, model.cmvn_istd)

    def chunk() -> torch.Tensor:
        return model.chunk(feats, state, rows, impl=Impl.STEP, check=False, weights=w)[0]

    conv = encoder_step.stacked_pool([layer.conv for layer in state.layers])
    ssm = encoder_step.stacked_pool([layer.ssm for layer in state.layers])
    one = graphed_us(chunk, args.calls, args.replays)
    dots = graphed_us(lambda: encoder_step.encoder_step(front(), w, conv, ssm, rows, check=False), args.calls,
                      args.replays)  # fmt: skip
    per_layer = graphed_us(lambda: model.head(model._step_layers(front(), state, rows)), args.calls, args.replays)
    return one, dots, per_layer


def stepper_times(model: ASRModel, b: int, l: int, args: argparse.Namespace, one_launch: bool) -> tuple[float, float]:
    """(GPU us, wall us) of one graphed EncoderStepper step of b streams by l frames, by the one-launch path (with
    its Triton front end) where it applies, or by the per-layer path (cuDNN front end below 4,096 frames)."""
    stepper = EncoderStepper(model, 64, "cuda")
    if not one_launch:
        stepper.weights = None
    feats = torch.randn(b, 4 * l, N_MELS, device="cuda")
    slots = list(range(b))
    for _ in range(5):
        stepper(feats, slots)
    torch.cuda.synchronize()
    gpu, wall = [], []
    for _ in range(args.replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        stepper(feats, slots)
        end.record()
        end.synchronize()
        wall.append((time.perf_counter() - t0) * 1e6)
        gpu.append(start.elapsed_time(end) * 1000)
    return statistics.median(gpu), statistics.median(wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["1x1", "1x4", "1x8", "4x1", "4x4", "16x1"], help="B x L")
    p.add_argument("--block-p", type=int, nargs="+", default=[16], help="the tl.dot form's state rows a program")
    p.add_argument("--warps", type=int, nargs="+", default=[4], help="the tl.dot form's warps a program")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", getattr(torch, args.dtype)).eval()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, us a call (GPU time, CUDA graph of {args.calls} calls)\n")
    print("| B x L | BLOCK_P | warps | one launch | tl.dot form | per layer | stepper GPU | stepper wall "
          "| stepper GPU, per layer | stepper wall, per layer |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for spec in args.rows:
            b, l = (int(v) for v in spec.split("x"))
            for block_p in args.block_p:
                for warps in args.warps:
                    encoder_step._BLOCK_P, encoder_step._WARPS = block_p, warps
                    paths = model_paths(model, b, l, args)
                    steps = [stepper_times(model, b, l, args, one_launch) for one_launch in (True, False)]
                    cells = " | ".join(f"{v:.1f}" for v in (*paths, *steps[0], *steps[1]))
                    print(f"| {b} x {l} | {block_p} | {warps} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
