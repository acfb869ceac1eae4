"""How long a stream's first chunk of each length takes on a fresh machine (Triton's compile and the CUDA graph's
capture), then how fast the rest of a long stream goes: the loop of `tests/test_model_gpu.py::test_sixty_minute_stream`
(default model, float32, random weights, one stream on slot 2 of 4, random chunks of 1-16 frames), timed.

    source scripts/device_env.sh && python3 bench/first_calls.py [--frames 90000] [--seed 0]

Prints the elapsed seconds at each chunk length's first call (synchronized), every 5,000 frames, after the stream,
after the offline forward, after the pure-PyTorch reference over the first 2,000 frames, and the offline
log-probs' relative error every 9 minutes. The first calls' times are a cold start only where Triton's cache
(~/.triton/cache) is empty, as on the device tool's fresh machines.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from asr.features import CMVN, N_MELS
from asr.model import ASRModel, Impl, ModelDimensions
from asr.stepper import EncoderStepper

MINUTE = 1500  # encoder frames of 40 ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=90_000, help="encoder frames of the stream (default: 60 min)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()

    def say(*what: object) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s]", *what, flush=True)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    with torch.inference_mode():
        model = ASRModel(ModelDimensions(), CMVN(torch.zeros(N_MELS), torch.ones(N_MELS))).cuda().eval()
        feats = torch.randn(1, 4 * args.frames, N_MELS, device="cuda")
        stepper = EncoderStepper(model, capacity=4, device="cuda")
        streamed = torch.empty(args.frames, model.dims.vocab_size, device="cuda")
        i, seen = 0, set()
        say("start")
        while i < args.frames:
            n = min(random.randint(1, 16), args.frames - i)
            streamed[i : i + n] = stepper(feats[:, 4 * i : 4 * (i + n)], [2])[0]
            if n not in seen:
                torch.cuda.synchronize()
                seen.add(n)
                say("first chunk of", n, "at frame", i)
            i += n
            if i // 5000 != (i - n) // 5000:
                torch.cuda.synchronize()
                say("frame", i)
        torch.cuda.synchronize()
        say("streamed")
        offline = model(feats)[0].float().log_softmax(-1)
        torch.cuda.synchronize()
        say("offline")
        model.chunk(feats[:, : 4 * 2000], model.init_state(1), impl=Impl.TORCH)
        torch.cuda.synchronize()
        say("reference over 2,000 frames")
        errors = [(streamed[a : a + MINUTE] - offline[a : a + MINUTE]).norm() / offline[a : a + MINUTE].norm()
                  for a in range(0, args.frames, 9 * MINUTE)]  # fmt: skip
        say("relative error every 9 minutes:", " ".join(f"{e.item():.1e}" for e in errors))


if __name__ == "__main__":
    main()
