"""Fill Triton's on-disk cache with every kernel `tests/test_model_gpu.py::test_sixty_minute_stream` compiles, one
process a chunk length, all at once: on a fresh device machine the test's 16 chunk lengths otherwise compile one
after another for 11-20 s each (about 4 minutes; BENCHMARKS.md, session 18). Session 19, one H100 with 16 cores:
25 s for all 17 processes, after which the test ran in 41 s.

    source scripts/device_env.sh && python3 scripts/precompile_sixty.py
    pytest -m gpu tests/test_model_gpu.py -k sixty

Each worker builds the test's model (default dimensions, float32, random weights) and captures its graphs for one
chunk length at batch 1 (slot pool of 4, as the test's stepper); worker 0 runs the offline forward over the test's
90,000 frames. The compiled kernels land in TRITON_CACHE_DIR (default ~/.triton/cache), where the test finds them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from asr.features import CMVN, N_MELS
from asr.model import ASRModel, ModelDimensions
from asr.stepper import MAX_GRAPH_FRAMES, EncoderStepper

FRAMES = 90_000  # the test's stream: 60 minutes of 40 ms encoder frames
CAPACITY = 4  # the test's stepper


def compile_one(frames: int) -> None:
    """Compile what the test runs for chunks of `frames` encoder frames (0: its offline forward)."""
    model = ASRModel(ModelDimensions(), CMVN(torch.zeros(N_MELS), torch.ones(N_MELS))).cuda().eval()
    with torch.inference_mode():
        if frames == 0:
            model(torch.randn(1, 4 * FRAMES, N_MELS, device="cuda"))
        else:
            EncoderStepper(model, capacity=CAPACITY, device="cuda").warmup([frames], [1], progress=False)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a worker's chunk length
    args = parser.parse_args()
    if args.one is not None:
        compile_one(args.one)
        return
    start = time.perf_counter()
    jobs = [subprocess.Popen([sys.executable, __file__, "--one", str(n)]) for n in range(MAX_GRAPH_FRAMES + 1)]
    failed = [n for n, job in enumerate(jobs) if job.wait() != 0]
    print(f"compiled in {time.perf_counter() - start:.0f} s" + (f"; failed: chunk lengths {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
