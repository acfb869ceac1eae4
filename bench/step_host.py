"""Where the wall time of one graphed batch-1 step goes outside the kernels: the whole `EncoderStepper` call against
the same call given the graph's own input buffer (`EncoderStepper.inputs`: no copy), its graph's replay alone
and against the floors of a launch and a sync, then a torch.profiler timeline of one step
(host calls and GPU kernels on one clock, us from the step's start).

    source scripts/device_env.sh && python3 bench/step_host.py [--steps 2000] [--dtype bfloat16] [--out DIR]

Default model (`ModelDimensions()`), random weights. Every figure is the median wall time (perf_counter around the
call and a device synchronize) over `--steps` calls, after a warm-up, and after `--spin-up-seconds` of matmuls
that raise an idle GPU's clocks. With `--out`, the profiler's Chrome trace is written there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from asr.features import N_MELS
from asr.model import ASRModel, ModelDimensions
from asr.stepper import EncoderStepper


def wall_us(fn: Callable[[], object], steps: int) -> float:
    """Median wall us of fn() + a device sync, after 50 untimed calls."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def spin_up(seconds: float) -> None:
    """Back-to-back matmuls for `seconds`, so the clocks of an idle GPU have risen."""
    a = torch.randn(4096, 4096, device="cuda")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            a @ a
        torch.cuda.synchronize()


def tiny_graph() -> torch.cuda.CUDAGraph:
    """A graph of one one-element kernel: the floor of a replay."""
    x = torch.zeros(1, device="cuda")
    x.add_(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
    return graph


def timeline(stepper: EncoderStepper, feats: torch.Tensor, out: Path | None) -> list[str]:
    """Host calls and GPU kernels of the middle one of 21 profiled steps, us from its start, one line each."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(21):
            with record_function(f"step{i}"):
                stepper(feats, [0])
                torch.cuda.synchronize()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / "step_host_trace.json"))
    events = prof.events()
    step = next(e for e in events if e.name == "step10")
    t0, t1 = step.time_range.start, step.time_range.end
    lines = []
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.name.startswith("step") or not (t0 <= e.time_range.start <= t1 + 200):
            continue
        kind = "gpu " if e.device_type == torch.autograd.DeviceType.CUDA else "host"
        lines.append(f"{kind} {e.time_range.start - t0:8.1f} .. {e.time_range.end - t0:8.1f}  {e.name[:70]}")
    lines.append(f"step10 wall {t1 - t0:.1f} us")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--spin-up-seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", getattr(torch, args.dtype)).eval()
    stepper = EncoderStepper(model, 1, "cuda")
    stepper.warmup([1], [1])
    feats = torch.randn(1, 4, N_MELS, device="cuda")
    own = stepper.inputs(1, 1)  # the graph's static input: a call given it copies nothing
    graph = stepper._graph(1, 1).graph
    tiny = tiny_graph()
    spin_up(args.spin_up_seconds)
    with torch.inference_mode():
        rows = {
            "EncoderStepper call (1 x 1)": wall_us(lambda: stepper(feats, [0]), args.steps),
            "the same, given its graph's input (`inputs`, no copy)": wall_us(lambda: stepper(own, [0]), args.steps),
            "its graph's replay alone": wall_us(graph.replay, args.steps),
            "a one-kernel graph's replay": wall_us(tiny.replay, args.steps),
            "a sync alone": wall_us(lambda: None, args.steps),
        }
        lines = timeline(stepper, feats, args.out)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, 12 x 256, median wall us of {args.steps} calls + sync\n")
    print("| what | us |\n|---|---:|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} |")
    print("\none profiled step (us from its start):")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
