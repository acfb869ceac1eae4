"""Cost of one beam search (`BeamSearch.words`) and whether it holds Python's interpreter lock.

Times one segment of flat random log-probabilities (the beam's worst case: no frame is sure),
then the same work on two threads at once: if flashlight released the lock while it decodes, two
threads on two cores would take about half as long as one after the other.

    python bench/lm_speed.py [--lm models/default/lm] [--frames 150] [--repeats 10]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from asr import DEFAULT_MODEL_DIR
from asr.lm import BeamSearch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", type=Path, default=DEFAULT_MODEL_DIR / "lm")
    p.add_argument("--frames", type=int, default=150, help="frames of 40 ms per segment (default: 150 = 6 s)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    log_probs = torch.randn(args.frames, 29).log_softmax(-1)
    searches = [BeamSearch(args.lm), BeamSearch(args.lm)]
    searches[0].words(log_probs)  # warm-up

    def run(search: BeamSearch) -> None:
        for _ in range(args.repeats):
            search.words(log_probs)

    start = time.perf_counter()
    run(searches[0])
    one = (time.perf_counter() - start) / args.repeats
    threads = [threading.Thread(target=run, args=(s,)) for s in searches]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = time.perf_counter() - start
    print(f"one segment of {args.frames} frames: {1000 * one:.1f} ms (mean of {args.repeats})")
    print(
        f"2 threads x {args.repeats}: {1000 * both:.0f} ms, one after the other {2000 * one * args.repeats:.0f} ms "
        f"(ratio {both / (2 * one * args.repeats):.2f}; about 0.5 would mean the lock is released)"
    )


if __name__ == "__main__":
    main()
