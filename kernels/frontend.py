"""One streaming step of the model's front end (CMVN + `Subsampling.chunk`) on a slot pool, as one Triton kernel.

Same function as `frontend_step_ref` below: for L (1..16) output frames of B streams whose conv caches live in
rows `slots` of preallocated pools, updated in place,

    x = (feats - cmvn_mean) * cmvn_istd                         rounded to the model dtype
    h1 = cat(conv1_cache row, x)   a = silu(conv1(h1))           3x3, stride 2, mel padding 1 -> (C, 2L, M1)
    h2 = cat(conv2_cache row, a)   b = silu(conv2(h2))           3x3, stride 2, mel padding 1 -> (C, L, M2)
    out = Linear(b as (L, C M2))                                 -> (L, D)

and the cache rows become the last frames of h1 and h2. Every intermediate is rounded to the model dtype where
PyTorch rounds it (conv output, silu, linear output); sums are float32 (tl.dot with "ieee" precision for float32
weights, never tf32).

Shapes: B streams, T = 4 L feature frames, M n_mels, M1 = (M - 1) // 2 + 1, M2 = (M1 - 1) // 2 + 1, C front-end
channels, D d_model, S pool slots. feats (B, T, M) float32, conv1_cache (S, 1, 1, M), conv2_cache (S, C, 1, M1),
slots (B,) int64 distinct, cmvn_mean / cmvn_istd (M,) (a bf16 model's buffers are bf16: read as float32, as
PyTorch promotes them against float32 feats), conv1_weight (C, 1, 3, 3), conv2_weight (C, C, 3, 3),
conv biases (C,), out_weight (D, C M2), out_bias (D,); the caches and weights share the model dtype.

Kernel `_frontend_kernel`, grid (B,): one program per stream, in three phases separated by barriers.
  1. conv1 + silu of the 2L rows of `a` (a (C, M1) tile per row, 9 taps of normalized feature frames or, for
     h1 row 0, the old conv1 cache row) into a scratch copy of h2 (B, 2L + 1, C, M1), whose row 0 is the old
     conv2 cache row. Every read of the old cache rows happens here.
  2. the new cache rows (h1's last frame, h2's last row), then conv2 + silu as an im2col tl.dot per tile of
     BLOCK_M rows (t, g) of the L M2 output positions: A (BLOCK_M, 9 C) gathered from the h2 scratch, times
     conv2_weight viewed as (C, 9 C), transposed; into a scratch b (B, L, C M2) in the Linear's input layout.
  3. the Linear: (L padded to 16, C M2) @ out_weight^T in BLOCK_N column blocks, + out_bias.
The scratch is written and read back by the same program (global memory, made visible by the barriers).

The pools are addressed through slots[b]: no gather or scatter, rows outside `slots` are untouched. Rows that
share a slot race (`check=True` rejects them, a device sync; pass False under CUDA graph capture). No
autotuning: the kernel writes the pools in place.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from asr.model import _causal_time_pad, _halved
from kernels.step import check_slots

__all__ = ["frontend_step", "frontend_step_ref", "MAX_FRAMES"]

MAX_FRAMES = 16  # output frames per call (L is a constexpr)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WARPS = 4
_CONV_ROWS = 64  # conv2 output positions (t, g) per tl.dot tile
_K_BLOCK = 64  # reduction block of both tl.dots
_OUT_BLOCK = 128  # Linear output columns per tl.dot tile


def frontend_step_ref(
    feats,
    conv1_cache,
    conv2_cache,
    slots,
    cmvn_mean,
    cmvn_istd,
    conv1_weight,
    conv1_bias,
    conv2_weight,
    conv2_bias,
    out_weight,
    out_bias,
):
    """The step in PyTorch (`ASRModel._normalize` + `Subsampling.chunk`): (B, L, D) in the weights' dtype; the
    cache rows `slots` are rewritten in place."""
    x = ((feats - cmvn_mean) * cmvn_istd).to(out_weight.dtype).unsqueeze(1)
    h1 = _causal_time_pad(x, conv1_cache[slots])
    h2 = _causal_time_pad(F.silu(F.conv2d(h1, conv1_weight, conv1_bias, stride=2, padding=(0, 1))), conv2_cache[slots])
    b = F.silu(F.conv2d(h2, conv2_weight, conv2_bias, stride=2, padding=(0, 1)))
    conv1_cache.index_copy_(0, slots, h1[:, :, -1:])
    conv2_cache.index_copy_(0, slots, h2[:, :, -1:])
    return F.linear(b.permute(0, 2, 1, 3).flatten(2), out_weight, out_bias)


@triton.jit
def _silu_rounded(v, dtype: tl.constexpr):
    """silu(v rounded to dtype), rounded to dtype, as PyTorch's conv output then F.silu in that dtype."""
    v = v.to(dtype).to(tl.float32)
    return (v * tl.sigmoid(v)).to(dtype)


@triton.jit
def _h1_row(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, r, cols, mask, M, dtype: tl.constexpr):
    """Columns cols of h1 row r, float32 (rounded to dtype): the conv1 cache row for r = 0, else the normalized
    feature frame r - 1 of feats_ptr (T, M)."""
    cached = tl.load(cache1_ptr + cols, mask=mask & (r == 0), other=0.0).to(tl.float32)
    f = tl.load(feats_ptr + (r - 1) * M + cols, mask=mask & (r > 0), other=0.0)
    mean = tl.load(mean_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    istd = tl.load(istd_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(r == 0, cached, ((f - mean) * istd).to(dtype).to(tl.float32))


@triton.jit
def _conv1_rows(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, w1_ptr, b1_ptr, h2_ptr, M, M1, C,
                L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):  # fmt: skip
    """Phase 1: h2 rows 1 .. 2L (h2_ptr (2L + 1, C, M1)) = silu(conv1(h1)), h1 from `_h1_row`."""
    dtype: tl.constexpr = h2_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    f = tl.arange(0, BLOCK_F)
    out_mask = (c < C)[:, None] & (f < M1)[None, :]
    bias = tl.load(b1_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    for s in range(2 * L):
        acc = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32) + bias[:, None]
        for kt in tl.static_range(3):
            for kf in tl.static_range(3):
                cols = 2 * f - 1 + kf
                valid = (f < M1) & (cols >= 0) & (cols < M)
                x = _h1_row(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, 2 * s + kt, cols, valid, M, dtype)
                w = tl.load(w1_ptr + c * 9 + kt * 3 + kf, mask=c < C, other=0.0).to(tl.float32)
                acc += w[:, None] * x[None, :]
        tl.store(h2_ptr + ((s + 1) * C + c[:, None]) * M1 + f[None, :], _silu_rounded(acc, dtype), mask=out_mask)


@triton.jit
def _conv2_tile(h2_ptr, w2_ptr, b2_ptr, b_ptr, m0, M1, M2, C,
                L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    """Phase 2: output positions m0 .. m0 + BLOCK_M (m = t M2 + g) of silu(conv2(h2)) into b_ptr (L, C M2), by
    im2col: A[m, k] = h2[2t + kt, ci, 2g - 1 + kf] for k = 9 ci + 3 kt + kf, times conv2_weight (C, 9 C)^T."""
    m = m0 + tl.arange(0, BLOCK_M)
    t, g = m // M2, m % M2
    m_ok = m < L * M2
    co = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, 9 * C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ci, kt, kf = k // 9, (k // 3) % 3, k % 3
        rows = 2 * t[:, None] + kt[None, :]
        cols = 2 * g[:, None] - 1 + kf[None, :]
        a_mask = m_ok[:, None] & (k < 9 * C)[None, :] & (cols >= 0) & (cols < M1)
        a = tl.load(h2_ptr + (rows * C + ci[None, :]) * M1 + cols, mask=a_mask, other=0.0)
        w_mask = (k < 9 * C)[:, None] & (co < C)[None, :]
        w = tl.load(w2_ptr + co[None, :] * (9 * C) + k[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc += tl.load(b2_ptr + co, mask=co < C, other=0.0).to(tl.float32)[None, :]
    b_off = t[:, None] * (C * M2) + co[None, :] * M2 + g[:, None]
    tl.store(b_ptr + b_off, _silu_rounded(acc, b_ptr.dtype.element_ty), mask=m_ok[:, None] & (co < C)[None, :])


@triton.jit
def _linear(b_ptr, w_ptr, bias_ptr, out_ptr, K, D,
            L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            PRECISION: tl.constexpr):  # fmt: skip
    """Phase 3: out_ptr (L, D) = b_ptr (L, K) @ w_ptr (D, K)^T + bias, rounded to out's dtype."""
    t = tl.arange(0, BLOCK_L)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(b_ptr + t[:, None] * K + k[None, :], mask=(t < L)[:, None] & (k < K)[None, :], other=0.0)
            w = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=(k < K)[:, None] & (n < D)[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        acc += tl.load(bias_ptr + n, mask=n < D, other=0.0).to(tl.float32)[None, :]
        out_mask = (t < L)[:, None] & (n < D)[None, :]
        tl.store(out_ptr + t[:, None] * D + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _frontend_kernel(feats_ptr, cache1_ptr, cache2_ptr, slots_ptr, mean_ptr, istd_ptr, w1_ptr, b1_ptr, w2_ptr,
                     b2_ptr, wo_ptr, bo_ptr, h2_ptr, b_ptr, out_ptr, M, M1, M2, C, D,
                     L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_MEL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):  # fmt: skip
    """Program b: the whole step of stream b (phases 1-3 of the module docstring)."""
    b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + b)
    feats_ptr += b * (4 * L) * M
    cache1_ptr += slot * M
    cache2_ptr += slot * C * M1
    h2_ptr += b * (2 * L + 1) * C * M1
    b_ptr += b * L * C * M2
    dtype: tl.constexpr = h2_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)[:, None]
    f = tl.arange(0, BLOCK_F)[None, :]
    row_mask = (c < C) & (f < M1)
    tl.store(h2_ptr + c * M1 + f, tl.load(cache2_ptr + c * M1 + f, mask=row_mask), mask=row_mask)
    _conv1_rows(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, w1_ptr, b1_ptr, h2_ptr, M, M1, C, L, BLOCK_C, BLOCK_F)
    mel = tl.arange(0, BLOCK_MEL)
    x_last = _h1_row(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, 4 * L, mel, mel < M, M, dtype)
    tl.debug_barrier()  # all reads of the old cache rows are done, the h2 scratch is written
    tl.store(cache1_ptr + mel, x_last.to(dtype), mask=mel < M)
    new_row = tl.load(h2_ptr + (2 * L * C + c) * M1 + f, mask=row_mask)
    tl.store(cache2_ptr + c * M1 + f, new_row, mask=row_mask)
    for m0 in range(0, L * M2, BLOCK_M):
        _conv2_tile(h2_ptr, w2_ptr, b2_ptr, b_ptr, m0, M1, M2, C, L, BLOCK_M, BLOCK_C, BLOCK_K, PRECISION)
    tl.debug_barrier()  # the b scratch is written
    _linear(b_ptr, wo_ptr, bo_ptr, out_ptr + b * L * D, C * M2, D, L, BLOCK_L, BLOCK_N, BLOCK_K, PRECISION)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_shapes(feats, conv1_cache, conv2_cache, slots, cmvn_mean, cmvn_istd, weights) -> tuple[int, ...]:
    """Raise ValueError unless the shapes fit; returns (B, L, M, C, D)."""
    if feats.dim() != 3 or feats.shape[0] == 0 or feats.shape[1] % 4 or feats.shape[1] == 0:
        raise ValueError(f"feats must be (B, 4 L, n_mels) with B, L >= 1, got {tuple(feats.shape)}")
    b, t, m = feats.shape
    if t // 4 > MAX_FRAMES:
        raise ValueError(f"frontend_step takes 1 to {MAX_FRAMES} output frames (4 L feature frames), got L = "
                         f"{t // 4}; split longer input into several calls")  # fmt: skip
    c = weights["conv1_weight"].shape[0]
    m2 = _halved(_halved(m))
    d = weights["out_weight"].shape[0]
    expected = {
        "cmvn_mean": (m,), "cmvn_istd": (m,), "conv1_weight": (c, 1, 3, 3), "conv1_bias": (c,),
        "conv2_weight": (c, c, 3, 3), "conv2_bias": (c,), "out_weight": (d, c * m2), "out_bias": (d,),
    }  # fmt: skip
    named = {"cmvn_mean": cmvn_mean, "cmvn_istd": cmvn_istd, **weights}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(named[name].shape)}")
    s = conv1_cache.shape[0]
    if tuple(conv1_cache.shape) != (s, 1, 1, m) or tuple(conv2_cache.shape) != (s, c, 1, _halved(m)):
        raise ValueError(f"conv1_cache and conv2_cache must be (S, 1, 1, {m}) and (S, {c}, 1, {_halved(m)}), got "
                         f"{tuple(conv1_cache.shape)} and {tuple(conv2_cache.shape)}")  # fmt: skip
    if slots.dtype != torch.int64 or tuple(slots.shape) != (b,):
        raise ValueError(f"slots must be int64 of shape ({b},), got {slots.dtype} {tuple(slots.shape)}")
    return b, t // 4, m, c, d


def _check_types(feats, conv1_cache, conv2_cache, slots, cmvn_mean, cmvn_istd, weights) -> None:
    """Raise ValueError unless dtypes, devices and the pools' layout fit."""
    dtype = weights["out_weight"].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"the weights must be float32, bfloat16 or float16, got {dtype}")
    for name, t in {**weights, "conv1_cache": conv1_cache, "conv2_cache": conv2_cache}.items():
        if t.dtype != dtype:
            raise ValueError(f"{name} must have out_weight's dtype {dtype}, got {t.dtype}")
    if feats.dtype != torch.float32:
        raise ValueError(f"feats must be float32, got {feats.dtype}")
    for name, t in {"cmvn_mean": cmvn_mean, "cmvn_istd": cmvn_istd}.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name, t in {"conv1_cache": conv1_cache, "conv2_cache": conv2_cache}.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")
    others = {"conv1_cache": conv1_cache, "conv2_cache": conv2_cache, "slots": slots, "cmvn_mean": cmvn_mean,
              "cmvn_istd": cmvn_istd, **weights}  # fmt: skip
    for name, t in others.items():
        if t.device != feats.device:
            raise ValueError(f"all tensors must be on one device: feats is on {feats.device}, {name} on {t.device}")
    if feats.device.type != "cuda" and not _interpreting():
        raise ValueError(f"frontend_step needs CUDA tensors (or TRITON_INTERPRET=1), got {feats.device}")


def frontend_step(
    feats,
    conv1_cache,
    conv2_cache,
    slots,
    cmvn_mean,
    cmvn_istd,
    conv1_weight,
    conv1_bias,
    conv2_weight,
    conv2_bias,
    out_weight,
    out_bias,
    check=True,
):
    """The Triton form of `frontend_step_ref`: returns (B, L, D) in the weights' dtype and rewrites the cache rows
    `slots` in place, in one launch. `check=False` skips `check_slots` (no device sync; the caller vouches)."""
    weights = dict(conv1_weight=conv1_weight, conv1_bias=conv1_bias, conv2_weight=conv2_weight,
                   conv2_bias=conv2_bias, out_weight=out_weight, out_bias=out_bias)  # fmt: skip
    pools = (feats, conv1_cache, conv2_cache, slots, cmvn_mean, cmvn_istd)
    b, l, m, c, d = _check_shapes(*pools, weights)
    _check_types(*pools, weights)
    if check:
        check_slots(slots, conv1_cache.shape[0])
    m1, m2 = _halved(m), _halved(_halved(m))
    dtype, device = out_weight.dtype, feats.device
    h2 = torch.empty(b, 2 * l + 1, c, m1, device=device, dtype=dtype)
    conv_out = torch.empty(b, l, c * m2, device=device, dtype=dtype)
    out = torch.empty(b, l, d, device=device, dtype=dtype)
    _frontend_kernel[(b,)](
        feats.contiguous(), conv1_cache, conv2_cache, slots, cmvn_mean.contiguous(), cmvn_istd.contiguous(),
        *(w.contiguous() for w in weights.values()), h2, conv_out, out, m, m1, m2, c, d,
        **launch_constants(l, m, c, d, dtype),
    )  # fmt: skip
    return out


def launch_constants(l: int, m: int, c: int, d: int, dtype: torch.dtype) -> dict:
    """The kernel's constexprs and num_warps for L frames, M mels, C channels, d_model D and the model dtype."""
    m2 = _halved(_halved(m))
    return dict(
        L=l, BLOCK_C=max(16, triton.next_power_of_2(c)), BLOCK_F=triton.next_power_of_2(_halved(m)),
        BLOCK_MEL=triton.next_power_of_2(m), BLOCK_M=max(16, min(_CONV_ROWS, triton.next_power_of_2(l * m2))),
        BLOCK_K=_K_BLOCK, BLOCK_L=max(16, triton.next_power_of_2(l)),
        BLOCK_N=max(16, min(_OUT_BLOCK, triton.next_power_of_2(d))),
        PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=_WARPS,
    )  # fmt: skip
