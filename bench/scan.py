"""Selective scan on one GPU: the Triton kernels (kernels/ssd_scan.py) against the PyTorch chunked scan
(asr.ssm.ssd_scan), forward and forward + backward, median times from triton.testing.do_bench.

Default shapes are one training batch of the default model: batch 32, 1500 frames, 8 heads of 64,
d_state 64, 1 group; x, B and C in bf16 and dt, A in float32, as in training. Each side runs at
its own best chunk length (the results do not depend on it): 64 for PyTorch (asr.ssm.SCAN_CHUNK),
32 for Triton (kernels.ssd_scan.CHUNK, fewer register spills).

    python bench/scan.py [--batch 32] [--length 1500] [--ref-chunk 64] [--chunk 32]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from asr.ssm import SCAN_CHUNK
from asr.ssm import ssd_scan as torch_scan
from kernels.ssd_scan import CHUNK
from kernels.ssd_scan import ssd_scan as triton_scan


def make_inputs(batch: int, length: int, heads: int, head_dim: int, d_state: int, groups: int) -> list[torch.Tensor]:
    """x (b, l, h, p) bf16, dt (b, l, h), A (h,), B and C (b, l, g, n) bf16, all requiring grad."""
    dev = "cuda"
    x = torch.randn(batch, length, heads, head_dim, device=dev, dtype=torch.bfloat16)
    dt = F.softplus(torch.randn(batch, length, heads, device=dev) - 1)
    A = -torch.rand(heads, device=dev) * 4 - 0.1
    B = torch.randn(batch, length, groups, d_state, device=dev, dtype=torch.bfloat16)
    C = torch.randn_like(B)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


def time_scan(scan, inputs: list[torch.Tensor], dy: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Median ms of the forward and of forward + backward."""

    def forward() -> torch.Tensor:
        return scan(*inputs, chunk_size=chunk)[0]

    def forward_backward() -> None:
        forward().backward(dy)

    fwd = do_bench(forward, grad_to_none=inputs, return_mode="median")
    fwd_bwd = do_bench(forward_backward, grad_to_none=inputs, return_mode="median")
    return fwd, fwd_bwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--chunk", type=int, default=CHUNK, help="Triton chunk length")
    p.add_argument("--ref-chunk", type=int, default=SCAN_CHUNK, help="PyTorch chunk length")
    args = p.parse_args()

    inputs = make_inputs(args.batch, args.length, args.heads, args.head_dim, args.d_state, args.groups)
    dy = torch.randn(*inputs[0].shape, device="cuda")
    y_ref = torch_scan(*inputs, chunk_size=args.ref_chunk)[0]
    y = triton_scan(*inputs, chunk_size=args.chunk)[0]
    err = ((y - y_ref).norm() / y_ref.norm()).item()

    ref = time_scan(torch_scan, inputs, dy, args.ref_chunk)
    tri = time_scan(triton_scan, inputs, dy, args.chunk)
    print(f"{datetime.date.today().isoformat()}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"batch {args.batch}, {args.length} steps, h={args.heads}, p={args.head_dim}, n={args.d_state}, "
        f"g={args.groups}, chunk {args.ref_chunk} (PyTorch) / {args.chunk} (Triton), bf16 x/B/C; "
        f"y relative difference {err:.1e}\n"
    )
    print("| scan | fwd (ms) | fwd + bwd (ms) |")
    print("|---|---|---|")
    print(f"| PyTorch `asr.ssm.ssd_scan` | {ref[0]:.3f} | {ref[1]:.3f} |")
    print(f"| Triton `kernels.ssd_scan` | {tri[0]:.3f} | {tri[1]:.3f} |")
    print(f"| speed-up | {ref[0] / tri[0]:.1f}x | {ref[1] / tri[1]:.1f}x |")


if __name__ == "__main__":
    main()
