"""Training throughput of the default model on one GPU: audio seconds per second, MFU, and where
the time goes (data wait, features + SpecAugment, forward + backward, optimizer; and the share
of the selective scan inside forward + backward, timed on its own at the same shapes).

Three passes over the same loader after the warm-up: the throughput pass runs steps as training does
(nothing waits for the device but the CTC loss), the phase pass waits for the device after each
phase to time it, which serialises the host and the device, so its steps are slower, and the loader
pass takes batches with no device work, once the batches the workers made ahead are drained: the
rate the loader sustains. The throughput pass can outrun that rate while the backlog made during the
warm-up (compilation) lasts.

    python bench/train_throughput.py --data data/synth/train.jsonl [--steps 40] [--config configs/default.toml]
        [--num-workers N] [--worker-nice N] [--compile | --no-compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from asr.data import SpeechDataset, bucket_batches, collate, read_source
from asr.features import ENCODER_FRAME_SAMPLES, SAMPLE_RATE, BatchLogMel, LogMel
from asr.model import ASRModel
from asr.text import Tokenizer
from kernels.ssd_scan import ssd_scan  # what the model runs on CUDA
from training.config import TrainConfig, load_config
from training.loop import (
    AudioCache,
    batch_features,
    forward_backward,
    make_augmenter,
    make_optimizer,
    worker_init,
)
from training.metrics import forward_flops_per_second_of_audio

T = TypeVar("T")


def cuda_time(fn: Callable[..., T], *args) -> tuple[T, float]:
    """(fn(*args), seconds from the call to the device finishing its work)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def scan_seconds(model: ASRModel, frames: int, batch: int, repeats: int = 5) -> float:
    """fwd + bwd of ssd_scan for every layer at one batch's shapes, bf16 inputs like training."""
    d, dev = model.dims, "cuda"
    x = torch.randn(batch, frames, d.n_heads, d.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dt = torch.rand(batch, frames, d.n_heads, device=dev, requires_grad=True)
    A = -torch.rand(d.n_heads, device=dev)
    B = torch.randn(batch, frames, d.n_groups, d.d_state, device=dev, dtype=torch.bfloat16, requires_grad=True)
    C = torch.randn_like(B, requires_grad=True)

    def run() -> None:
        for _ in range(d.n_layers):
            y, _ = ssd_scan(x, dt, A, B, C)
            y.sum().backward()

    run()
    return sum(cuda_time(run)[1] for _ in range(repeats)) / repeats


@dataclasses.dataclass
class Step:
    """What one step needs: the model and its optimizer, the feature extractor, the config."""

    model: ASRModel
    optimizer: torch.optim.Optimizer
    logmel: LogMel | BatchLogMel
    cfg: TrainConfig
    generator: torch.Generator

    def features(self, batch):
        return batch_features(batch, self.logmel, self.model.cmvn_mean, self.cfg, torch.device("cuda"), self.generator)

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclasses.dataclass
class Pass:
    """What a timed pass measured: audio seconds, wall seconds, the batches' (utterances, encoder frames) and,
    for the phase pass, seconds per phase."""

    audio_s: float = 0.0
    wall: float = 0.0
    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)


def throughput_pass(step: Step, it, steps: int) -> Pass:
    """Steps as training runs them."""
    audio_s, shapes = 0.0, []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        feats, lengths = step.features(batch)
        forward_backward(step.model, feats, lengths, batch, step.cfg)
        step.update()
        audio_s += float(batch.audio_lengths.sum()) / SAMPLE_RATE
        shapes.append((batch.audio.shape[0], -(-batch.audio.shape[1] // ENCODER_FRAME_SAMPLES)))
    torch.cuda.synchronize()
    return Pass(audio_s, time.perf_counter() - start, shapes)


def loader_pass(it, steps: int, backlog: int) -> Pass:
    """The loader alone: `steps` batches taken as fast as the workers make them, after the `backlog` batches
    they had made ahead are drained (untimed). An upper bound of what the loader sustains in training, where
    the main process also needs CPU."""
    for _ in range(backlog):
        next(it)
    audio_s, start = 0.0, time.perf_counter()
    for _ in range(steps):
        audio_s += float(next(it).audio_lengths.sum()) / SAMPLE_RATE
    return Pass(audio_s, time.perf_counter() - start)


def phase_pass(step: Step, it, steps: int) -> Pass:
    """Steps with the device drained after each phase."""
    times = {"data": 0.0, "features": 0.0, "forward+backward": 0.0, "optimizer": 0.0}
    audio_s = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        times["data"] += time.perf_counter() - t
        (feats, lengths), seconds = cuda_time(step.features, batch)
        times["features"] += seconds
        times["forward+backward"] += cuda_time(forward_backward, step.model, feats, lengths, batch, step.cfg)[1]
        times["optimizer"] += cuda_time(step.update)[1]
        audio_s += float(batch.audio_lengths.sum()) / SAMPLE_RATE
    return Pass(audio_s, sum(times.values()), phases=times)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="training manifest (asr synth's train.jsonl)")
    p.add_argument("--config", type=Path, default=Path("configs/default.toml"), help="model, batching, augmentation")
    p.add_argument("--steps", type=int, default=40, help="steps in each timed pass (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--num-workers", type=int, help="loader workers (default: the config's data.num_workers)")
    p.add_argument(
        "--worker-nice", type=int, choices=range(20), metavar="0-19", help="loader workers' niceness (data.worker_nice)"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: run.compile)"
    )
    p.add_argument(
        "--augment-on-device",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reverb and noise on the GPU instead of in the workers (default: data.augment.on_device)",
    )
    p.add_argument(
        "--fft-features",
        action="store_true",
        help="features by an FFT per frame (LogMel, as inference) instead of training's DFT product (BatchLogMel)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config)
    overrides = {"num_workers": args.num_workers, "worker_nice": args.worker_nice}
    data_cfg = dataclasses.replace(cfg.data, **{k: v for k, v in overrides.items() if v is not None})
    if args.augment_on_device is not None:
        data_cfg = dataclasses.replace(
            data_cfg, augment=dataclasses.replace(data_cfg.augment, on_device=args.augment_on_device)
        )
    cfg = dataclasses.replace(cfg, data=data_cfg)
    device = torch.device("cuda")
    utts = list(read_source(args.data).utterances)
    cache = AudioCache(utts, 16, progress=False)
    model = ASRModel(cfg.model).to(device)
    compiled = cfg.run.compile if args.compile is None else args.compile
    if compiled:
        model.compile_blocks()
    extractor = LogMel() if args.fft_features else BatchLogMel()
    step = Step(
        model, make_optimizer(model, cfg.optim), extractor.to(device), cfg, torch.Generator(device).manual_seed(0)
    )
    index = {id(u): i for i, u in enumerate(utts)}
    batches = [[index[id(u)] for u in b] for b in bucket_batches(utts, cfg.data.max_batch_seconds, random.Random(0))]
    backlog = 2 * max(1, cfg.data.num_workers)  # the DataLoader's prefetch: 2 batches a worker
    batches *= -(-(args.warmup + 3 * args.steps + backlog) // len(batches))  # repeat epochs for a small corpus
    dataset = SpeechDataset(utts, Tokenizer(), make_augmenter(cfg.data, utts, cache), load=cache)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        pin_memory=True,
        worker_init_fn=worker_init(cfg.data),
    )
    it = iter(loader)
    throughput_pass(step, it, args.warmup)
    run, phases = throughput_pass(step, it, args.steps), phase_pass(step, it, args.steps)
    report(step, compiled, run, phases, loader_pass(it, args.steps, backlog))


def report(step: Step, compiled: bool, run: Pass, phases: Pass, loader: Pass) -> None:
    steps, d = len(run.shapes), step.cfg.data
    b, f = max(run.shapes, key=lambda s: s[0] * s[1])
    scan = scan_seconds(step.model, f, b) * steps  # upper bound: the largest batch shape every step
    rate = run.audio_s / run.wall
    mfu = rate * 3 * forward_flops_per_second_of_audio(step.cfg.model) / (step.cfg.run.peak_tflops * 1e12)
    print(
        f"\n{torch.cuda.get_device_name()} · compile {compiled} · {type(step.logmel).__name__} · "
        f"workers {d.num_workers} (nice {d.worker_nice}) · reverb+noise on {'GPU' if d.augment.on_device else 'CPU'} · "
        f"{steps} steps · {run.audio_s / steps:.0f} audio-s per batch"
    )
    print(f"throughput: {rate:,.0f} audio-s/s   MFU {100 * mfu:.2f}%   step {1000 * run.wall / steps:.0f} ms")
    print(f"phase pass (device drained after each phase): {phases.audio_s / phases.wall:,.0f} audio-s/s")
    print(f"loader alone (no device work, its backlog drained first): {loader.audio_s / loader.wall:,.0f} audio-s/s")
    print("| phase | ms/step | share |\n|---|---|---|")
    for name, sec in phases.phases.items():
        print(f"| {name} | {1000 * sec / steps:.1f} | {100 * sec / phases.wall:.0f}% |")
    print(
        f"| of which selective scan (fwd+bwd, {b}x{f} frames) | {1000 * scan / steps:.1f} | "
        f"{100 * scan / phases.wall:.0f}% |"
    )


if __name__ == "__main__":
    main()
