"""A/B of the one-frame launch: versions of `kernels/frame_step.py` (any files with its interface, such as a copy
from another commit: `git show REV:kernels/frame_step.py > /tmp/old.py`) timed side by side in one process, in
alternating rounds, by `bench/frame_exchange.py`'s `measure`.

    source scripts/device_env.sh && python3 bench/frame_ab.py /tmp/old.py kernels/frame_step.py [--rows 1 2]

Default model (`ModelDimensions()`), random weights (`--dtype`), from raw log-mel to log-probs. Each version is
checked against its own `frame_step_ref` and its kept workspace must be zero after a call; then `--calls` calls
captured in one CUDA graph, median GPU us a call over `--replays` replays, with the workspace kept and fresh.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from frame_exchange import load, measure  # bench/frame_exchange.py, beside this script

from asr.model import ASRModel, ModelDimensions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("versions", type=Path, nargs="+", help="files with kernels/frame_step.py's interface")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2], help="streams a launch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=50)
    args = p.parse_args()
    missing = [str(v) for v in args.versions if not v.is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    torch.manual_seed(0)
    model = ASRModel(ModelDimensions()).to("cuda", getattr(torch, args.dtype)).eval()
    mods = [load(f"frame_step_ab_{i}", v) for i, v in enumerate(args.versions)]
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, GPU us a call (graph of {args.calls} calls)", flush=True)
    with torch.inference_mode():
        for r in range(args.rounds):
            for path, mod in zip(args.versions, mods, strict=True):
                for b in args.rows:
                    err, kept, fresh = measure(mod, model, b, args)
                    print(f"round {r} {path} B={b}: error {err:.1e}, kept {kept:.1f}, fresh {fresh:.1f}", flush=True)


if __name__ == "__main__":
    main()
