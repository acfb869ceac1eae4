"""Where one training step's GPU time goes, without any data loading: a fixed batch of random audio
and random transcripts through features + SpecAugment, forward + backward and the optimizer, timed by
phase, then the step's CUDA kernels under torch.profiler, largest total first.

    python bench/train_profile.py [--batch 160] [--seconds 6] [--steps 20] [--config configs/default-stage3.toml]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from asr.data import collate
from asr.features import SAMPLE_RATE, BatchLogMel
from asr.model import ASRModel
from asr.text import VOCAB
from training.config import load_config
from training.loop import batch_features, forward_backward, make_optimizer


def random_batch(batch: int, seconds: float, generator: torch.Generator):
    """`batch` utterances of 0.6-1.0 x `seconds` of noise, each with 12 random characters a second (read speech)."""
    items = []
    for i in range(batch):
        n = int(seconds * SAMPLE_RATE * (0.6 + 0.4 * torch.rand(1, generator=generator).item()))
        chars = int(12 * n / SAMPLE_RATE)
        tokens = torch.randint(1, len(VOCAB), (chars,), generator=generator).tolist()
        items.append((f"u{i}", 0.1 * torch.randn(n, generator=generator), tokens))
    return collate(items)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/default-stage3.toml"))
    p.add_argument("--batch", type=int, default=160, help="utterances per step")
    p.add_argument("--seconds", type=float, default=6.0, help="longest utterance (the batch is padded to it)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 5 warm-up steps)")
    p.add_argument("--top", type=int, default=30, help="kernels to list")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="compile blocks (default: run.compile)"
    )
    args = p.parse_args()

    cfg = load_config(args.config)
    device = torch.device("cuda")
    model = ASRModel(cfg.model).to(device)
    if cfg.run.compile if args.compile is None else args.compile:
        model.compile_blocks()
    optimizer = make_optimizer(model, cfg.optim)
    logmel = BatchLogMel().to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = random_batch(args.batch, args.seconds, torch.Generator().manual_seed(0))
    batch.audio = batch.audio.pin_memory()

    def step(times: dict[str, float] | None) -> None:
        marks = [time.perf_counter()]

        def mark() -> None:
            if times is not None:
                torch.cuda.synchronize()
                marks.append(time.perf_counter())

        feats, lengths = batch_features(batch, logmel, model.cmvn_mean, cfg, device, generator)
        mark()
        forward_backward(model, feats, lengths, batch, cfg)
        mark()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark()
        if times is not None:
            for name, a, b in zip(times, marks[:-1], marks[1:], strict=True):
                times[name] += b - a

    for _ in range(5):
        step(None)
    times = {"features": 0.0, "forward+backward": 0.0, "optimizer": 0.0}
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(times)
    wall = time.perf_counter() - start
    audio_s = float(batch.audio_lengths.sum()) / SAMPLE_RATE
    print(f"{torch.cuda.get_device_name()} · batch {tuple(batch.audio.shape)} · {audio_s:.0f} audio-s a step")
    print(f"GPU-side throughput (no data loading): {audio_s * args.steps / wall:,.0f} audio-s/s")
    print("| phase | ms/step |\n|---|---|")
    for name, sec in times.items():
        print(f"| {name} | {1000 * sec / args.steps:.1f} |")

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(None)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
