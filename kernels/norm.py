"""Residual add and RMSNorm in one Triton kernel, for the streaming step.

Between two Mamba layers the step does `x = x + mixer(h)` and then the next layer's `h = rms_norm(x)`: in
PyTorch that is six small kernels (add, cast, square, mean, rsqrt, scale), launched twelve times per step.
`add_rms_norm` does both in one launch, a program per block of rows (2,048 elements):

    x_new = x + y   (rounded to x's dtype, as PyTorch's add is)       h = x_new * rsqrt(mean(x_new^2) + eps) * w

with the norm in float32. Without y it is the plain RMSNorm of x. `add_rms_norm_ref` is the same in PyTorch
(`asr.ssm.rms_norm`). Shapes: rows R (any leading dims flattened), width d.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from asr.ssm import rms_norm

__all__ = ["add_rms_norm", "add_rms_norm_ref"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ROW_ELEMENTS = 2048  # rows a program: as many as fill this many elements (8 of the default d_model 256)


def add_rms_norm_ref(
    x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (..., d), weight (d,) -> (x + y, rms_norm(x + y) * weight), both in x's dtype."""
    x_new = x + y if y is not None else x
    return x_new, rms_norm(x_new, weight, eps)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, y_ptr, w_ptr, x_out_ptr, h_ptr, rows, d, eps,
    HAS_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program i: rows i BLOCK_R ... of x (+ y) -> x_out (if HAS_Y) and their RMSNorm h."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (r < rows) & (cols < d)
    offs = r * d + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)  # PyTorch's add: float32, rounded to the dtype
        tl.store(x_out_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / d + eps)
    w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (xf * rstd[:, None] * w).to(h_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor) -> None:
    if x.dtype not in _DTYPES or not x.is_contiguous() or x.dim() < 1:
        raise ValueError(f"x must be a contiguous float32/bfloat16/float16 tensor, got {x.dtype} {tuple(x.shape)}")
    if y is not None and (y.shape != x.shape or y.dtype != x.dtype or not y.is_contiguous()):
        raise ValueError(f"y must be contiguous with x's shape and dtype {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(y.shape)} {y.dtype}")  # fmt: skip
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    tensors = [x, weight] + ([y] if y is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("x, y and weight must be on one device")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"add_rms_norm needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton form of `add_rms_norm_ref`: returns (x + y, its RMSNorm); (x, its RMSNorm) if y is None."""
    _check(x, y, weight)
    d = x.shape[-1]
    rows = x.numel() // d
    h = torch.empty_like(x)
    x_out = torch.empty_like(x) if y is not None else x
    if rows:
        block_d = triton.next_power_of_2(d)
        block_r = min(triton.next_power_of_2(rows), max(1, _ROW_ELEMENTS // block_d))
        _add_rms_norm_kernel[(triton.cdiv(rows, block_r),)](
            x, y if y is not None else x, weight.contiguous(), x_out, h, rows, d, eps,
            HAS_Y=y is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4 if block_r * block_d <= 2048 else 8,
        )  # fmt: skip
    return x_out, h
