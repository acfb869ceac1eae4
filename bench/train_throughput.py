"""Training throughput of the default model on one GPU: audio seconds per second, MFU, and where
the time goes (data wait, features + SpecAugment, forward + backward, optimizer; and the share
of the selective scan inside forward + backward, timed on its own at the same shapes).

    python bench/train_throughput.py --data data/synth/train.jsonl [--steps 40] [--config configs/default.toml]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from asr.data import SpeechDataset, bucket_batches, collate, read_source
from asr.features import SAMPLE_RATE, LogMel
from asr.model import ASRModel
from asr.text import Tokenizer
from kernels.ssd_scan import ssd_scan  # what the model runs on CUDA
from training.config import load_config
from training.loop import AudioCache, batch_features, forward_backward, make_augmenter, make_optimizer
from training.metrics import forward_flops_per_second_of_audio


def cuda_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


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
    return sum(cuda_time(run) for _ in range(repeats)) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: run.compile)"
    )
    args = p.parse_args()

    cfg = load_config(args.config)
    device = torch.device("cuda")
    utts = list(read_source(args.data).utterances)
    cache = AudioCache(utts, 16, progress=False)
    model = ASRModel(cfg.model).to(device)
    compiled = cfg.run.compile if args.compile is None else args.compile
    if compiled:
        model.compile_blocks()
    optimizer = make_optimizer(model, cfg.optim)
    logmel = LogMel().to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    index = {id(u): i for i, u in enumerate(utts)}
    batches = [[index[id(u)] for u in b] for b in bucket_batches(utts, cfg.data.max_batch_seconds, random.Random(0))]
    batches *= -(-(args.warmup + args.steps) // len(batches))  # repeat epochs for a small corpus
    dataset = SpeechDataset(utts, Tokenizer(), make_augmenter(cfg.data, utts, cache), load=cache)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=True
    )
    times = {"data": 0.0, "features": 0.0, "forward+backward": 0.0, "optimizer": 0.0}
    audio_s, frames_seen, shapes = 0.0, 0, []
    it = iter(loader)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            times = dict.fromkeys(times, 0.0)
            audio_s, frames_seen, wall = 0.0, 0, time.perf_counter()
        t = time.perf_counter()
        batch = next(it)
        times["data"] += time.perf_counter() - t
        torch.cuda.synchronize()
        t = time.perf_counter()
        feats, lengths = batch_features(batch, logmel, model.cmvn_mean, cfg, device, generator)
        torch.cuda.synchronize()
        times["features"] += time.perf_counter() - t
        t = time.perf_counter()
        _, frames = forward_backward(model, feats, lengths, batch, cfg)
        torch.cuda.synchronize()
        times["forward+backward"] += time.perf_counter() - t
        times["optimizer"] += cuda_time(
            lambda: (
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
                optimizer.step(),
                optimizer.zero_grad(set_to_none=True),
            )
        )
        audio_s += float(batch.audio_lengths.sum()) / SAMPLE_RATE
        frames_seen += frames
        shapes.append((batch.audio.shape[0], -(-batch.audio.shape[1] // 640)))
    wall = time.perf_counter() - wall
    b, f = max(shapes, key=lambda s: s[0] * s[1])
    scan = scan_seconds(model, f, b) * args.steps  # upper bound: the largest batch shape every step
    rate = audio_s / wall
    mfu = rate * 3 * forward_flops_per_second_of_audio(cfg.model) / (cfg.run.peak_tflops * 1e12)
    name = torch.cuda.get_device_name()
    print(f"\n{name} · compile {compiled} · {args.steps} steps · {audio_s / args.steps:.0f} audio-s per batch")
    print(f"throughput: {rate:,.0f} audio-s/s   MFU {100 * mfu:.2f}%   step {1000 * wall / args.steps:.0f} ms")
    print("| phase | ms/step | share |\n|---|---|---|")
    for name, sec in times.items():
        print(f"| {name} | {1000 * sec / args.steps:.1f} | {100 * sec / wall:.0f}% |")
    print(
        f"| of which selective scan (fwd+bwd, {b}x{f} frames) | {1000 * scan / args.steps:.1f} | "
        f"{100 * scan / wall:.0f}% |"
    )


if __name__ == "__main__":
    main()
