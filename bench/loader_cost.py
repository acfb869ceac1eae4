"""CPU cost of the training loader per utterance: decoding plus the waveform augmentations of a training
config, on one thread, with the time of each augmentation. Training on one H200 needs the loader workers
together to produce more audio seconds per second than the GPU consumes (10,000 is the target), so
audio-s per CPU-s times `num_workers` bounds the training throughput.

    python bench/loader_cost.py DATA [--config configs/default-stage3.toml] [--utterances 120]

DATA is anything `asr.data.read_source` reads (a manifest, a transcripts.tsv folder, LibriSpeech).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import asr.augment
from asr.audio import load_audio
from asr.data import read_source
from training.config import load_config
from training.loop import make_augmenter

TIMED = ("speed_perturb", "add_noise", "babble", "colored_noise", "room_impulse_response", "reverberate",
         "telephone", "codec_round_trip")  # fmt: skip


def timed(times: dict[str, float], name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] += time.perf_counter() - start
        return out

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="training data to read")
    p.add_argument("--config", type=Path, default=Path("configs/default-stage3.toml"), help="its [data.augment]")
    p.add_argument("--utterances", type=int, default=120, help="how many utterances (default 120)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    cfg = load_config(args.config)
    utts = read_source(args.data).utterances[: args.utterances]
    times: dict[str, float] = defaultdict(float)
    for name in TIMED:  # the Augmenter calls these through the module
        setattr(asr.augment, name, timed(times, name, getattr(asr.augment, name)))
    load = timed(times, "decode (load_audio)", load_audio)
    augment = timed(times, "augment, all", make_augmenter(cfg.data, utts, load))
    audio_s, start = 0.0, time.perf_counter()
    for i, utt in enumerate(utts):
        audio = load(utt.audio)
        audio_s += audio.numel() / 16000
        augment(audio, np.random.default_rng([0, 0, i]))
    wall = time.perf_counter() - start
    print(f"{len(utts)} utterances, {audio_s:.0f} s of audio in {wall:.2f} s: {audio_s / wall:.0f} audio-s per CPU-s")
    print("(babble noise decodes other utterances inside 'augment, all': shares overlap)")
    for name, seconds in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {seconds:6.2f} s  {seconds / wall:4.0%}")


if __name__ == "__main__":
    main()
