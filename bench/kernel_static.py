"""Static figures of versions of `kernels/frame_step.py`'s one-launch kernel, compiled for sm_90a on this machine
(no GPU needed): ptxas's registers and spills, the PTX's `bar.sync` count, and the TTGIR's layout conversions
(each across warps a round trip through shared memory), listed by source line with `--list`.

    python3 bench/kernel_static.py kernels/frame_step.py [VARIANT.py ...] [--list]

A variant is any file with the module's `_frame_kernel` and `_WARPS`, such as an edited copy of the module
(`cp kernels/frame_step.py /tmp/v.py`, then edit). Fewer conversions and barriers are a
hint, not a timing: `bench/frame_ab.py` on the GPU decides (BENCHMARKS.md, session 19).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, even where the tests' conftest would interpret

from frame_exchange import load  # bench/frame_exchange.py, beside this script  # noqa: E402

from kernels.static import compile_frame_kernel, conversions, ptxas_usage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("versions", type=Path, nargs="+", help="files with kernels/frame_step.py's interface")
    p.add_argument("--list", action="store_true", help="print each layout conversion's source lines and type")
    p.add_argument("--block-p", type=int, choices=(4, 8, 16), default=4,
                   help="state rows a program: 4, 8 or 16, the launch of 1, 2 or 4 streams (default: 4)")  # fmt: skip
    args = p.parse_args()
    missing = [str(v) for v in args.versions if not v.is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    for i, path in enumerate(args.versions):
        mod = load(f"frame_step_static_{i}", path)
        compiled = compile_frame_kernel(mod._frame_kernel, mod._WARPS, block_p=args.block_p)
        found = conversions(compiled)
        bars = compiled.asm["ptx"].count("bar.sync")
        print(f"{path}: {ptxas_usage(compiled)}; {bars} bar.sync; {len(found)} layout conversions", flush=True)
        if args.list:
            print("\n".join(f"  {c}" for c in found))


if __name__ == "__main__":
    main()
