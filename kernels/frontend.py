"""One streaming step of the model's front end (CMVN + `Subsampling.chunk`) on a slot pool, in two Triton launches.

Same function as `frontend_step_ref` below: for L (1..16) output frames of B streams whose conv caches live in
rows `slots` of preallocated pools, updated in place,

    x = (feats - cmvn_mean) * cmvn_istd                         rounded to the model dtype
    h1 = cat(conv1_cache row, x)   a = silu(conv1(h1))           3x3, stride 2, mel padding 1 -> (C, 2L, M1)
    h2 = cat(conv2_cache row, a)   b = silu(conv2(h2))           3x3, stride 2, mel padding 1 -> (C, L, M2)
    out = Linear(b as (L, C M2))                                 -> (L, D)

and the cache rows become the last frames of h1 and h2. Every intermediate is rounded to the model dtype where
PyTorch rounds it (conv output, silu, linear output), so in bfloat16 the result is PyTorch's up to the order of the
float32 sums; sums are float32 (tl.dot, with "ieee" precision for float32 weights: never tf32).

Shapes: B streams, T = 4 L feature frames, M n_mels, M1 = (M - 1) // 2 + 1, M2 = (M1 - 1) // 2 + 1, C front-end
channels, D d_model, S pool slots. feats (B, T, M) float32, conv1_cache (S, 1, 1, M), conv2_cache (S, C, 1, M1),
slots (B,) int64 distinct, cmvn_mean / cmvn_istd (M,) (a bf16 model's buffers are bf16: read as float32, as
PyTorch promotes them against float32 feats), conv1_weight (C, 1, 3, 3), conv2_weight (C, C, 3, 3), conv biases
(C,), out_weight (D, C M2), out_bias (D,); the caches and weights share the model dtype.

Kernel 1, `_conv_kernel`, grid (B, n_co, n_q): program (b, j, q) computes output frames t0 = q FT .. t0 + FT - 1
of stream b, conv2 output channels of block j. While the batch leaves SMs idle (B < SM count) the work of a stream
is split over n_co <= 4 channel blocks and over blocks of FT = 2 frames, each program recomputing the part of `a`
it reads; otherwise a program does a whole stream (n_co = 1, FT = L).
  1. the h2 rows 2 t0 .. 2 t0 + 2 FT into the program's scratch (2 FT + 1, C, 2 PW) in a "plane layout": mel
     columns 2j in plane 0 and 2j - 1 in plane 1 (PW >= M2 + 1 entries each, zero outside 0 .. M1 - 1), so that
     each conv2 tap reads consecutive entries. h2 row 0 is the old conv2 cache row; the others are conv1 + silu,
     ROWS1 rows per im2col tl.dot: conv1_weight (C, 9 taps padded to 16) @ A^T (16, ROWS1 2 PW), the taps being
     normalized feature frames or, for h1 row 0, the old conv1 cache row.
  2. after a barrier (the scratch is global memory, written and read by the same program), conv2 + silu as an
     im2col tl.dot per BLOCK_M output positions (whole frames of PW, M2 used): conv2_weight (C, 9 C), the rows of
     block j, @ A^T (9 C, BLOCK_M) gathered from the scratch; into x (B L, C M2), the Linear's input layout.
The tiles are computed channels-first so that the gathers and stores run along the mel axis (consecutive
addresses, which Triton then spreads over a warp's lanes); an earlier version that gathered across channels, a
cache line per lane, took 880 us at B=1024 L=8 where this one takes about 340.

Kernel 2, `_linear_kernel`, grid (n_m n_n + B,): programs below n_m n_n each compute one (BLOCK_ML, BLOCK_N) tile
of out = x @ out_weight^T + out_bias, a plain GEMM over all B L rows (narrow tiles when there are few rows, so that
even one frame spreads the 0.6 MB weight over 8 SMs); the last B programs write the new cache rows of one stream
each (h1's last frame, recomputed from feats, and h2's last row, copied from the scratch).

Two launches, not one: the old cache rows are read by every conv program of a stream, so they may be overwritten
only once all of them are done, which one launch cannot order without a grid-wide barrier; and the Linear wants
its weight spread over several SMs even for one stream. The pools are addressed through slots[b]: no gather or
scatter, rows outside `slots` are untouched. Rows that share a slot race (`check=True` rejects them, a device
sync; pass False under CUDA graph capture). No autotuning: the launches write the pools in place. Scratch and
output are allocated with torch.empty (fine under graph capture).

Measured on an H200 with a scratch script that was not kept (bf16, default model shapes, CUDA graph of 10 calls, us
per call; PyTorch = the model's front end): B=1 L=1 17.8 (PyTorch 41.1), B=1 L=8 25.9 (45.1), B=64 L=1 20.0 (48.6),
B=256 L=4 52.8 (114.2), B=1024 L=8 363 (608). The conv kernel is most of it: its programs are chains of dependent
gather -> tl.dot steps, about 1 us each at small batches. Inside the whole graphed encoder step the gain showed at
first only for large batches (BENCHMARKS.md, session 5); with the conv kernel at 8 warps for whole-stream programs
it shows from 64 encoder frames a step (session 10), so `ASRModel` takes these kernels from
`FRONTEND_KERNEL_MIN_FRAMES` frames, and for the few streams of the one-launch encoder step. The h2 scratch is large
at large batches: B n_co n_q (2 FT + 1) C 2 PW elements, about 140 MB at B=1024, L=8 and 1.1 GB at B=4096, L=16 in
bf16, held in the CUDA graphs' shared memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from asr.ssm import causal_time_pad, halved
from kernels.step import _interpreting, _sm_count, check_slots

__all__ = ["FrontEndWeights", "frontend_step", "frontend_step_ref", "MAX_FRAMES"]

MAX_FRAMES = 16  # output frames per call (L is a constexpr)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_CO_SPLITS = 4  # conv2 output-channel blocks per stream while the batch leaves SMs idle
_TILE = 64  # conv2 output positions per tl.dot (whole frames of PW entries)
_K_BLOCK = 64  # reduction block of the conv2 and Linear tl.dots
# Conv kernel: conv1 rows per tl.dot, warps, software-pipelining stages. Chosen on an H200 (bf16, graphed): 2 rows,
# 4 warps, 1 stage (pipelining made the conv1 gathers 2-3x slower; K blocks of 128 or 256 and 8 warps were slower)
_CONV1_ROWS, _CONV_WARPS, _CONV_STAGES = 2, 4, 1
# ... except from B >= SMs streams (where the plan gives each program a whole stream): there 4 warps need 246 registers
# a thread (2 programs an SM, ncu) and 8 warps took 9-12 % less time at B = 1,024 and 4,096 (bench/frontend_plan.py,
# BENCHMARKS.md session 10)
_CONV_WARPS_MANY_STREAMS = 8


@dataclass(frozen=True)
class FrontEndWeights:
    """The front end's weights and CMVN statistics, as `frontend_step` takes them (`ASRModel.encoder_weights`), with
    two reordered copies made once for `kernels/frame_step.py`. Shapes as in the module docstring."""

    cmvn_mean: torch.Tensor  # (M,)
    cmvn_istd: torch.Tensor  # (M,)
    conv1_weight: torch.Tensor  # (C, 1, 3, 3)
    conv1_bias: torch.Tensor  # (C,)
    conv2_weight: torch.Tensor  # (C, C, 3, 3)
    conv2_bias: torch.Tensor  # (C,)
    out_weight: torch.Tensor  # (D, C M2)
    out_bias: torch.Tensor  # (D,)
    conv2_taps: torch.Tensor = field(init=False)  # (9, C, C): [3 kt + kf, co, ci] = conv2_weight[co, ci, kt, kf]
    out_by_mel: torch.Tensor = field(init=False)  # (M2, C, D): [m, c] = out_weight[:, c M2 + m]

    def __post_init__(self) -> None:
        c, d = self.conv1_weight.shape[0], self.out_weight.shape[0]
        object.__setattr__(self, "conv2_taps", self.conv2_weight.permute(2, 3, 0, 1).reshape(9, c, c).contiguous())
        by_mel = self.out_weight.reshape(d, c, -1).permute(2, 1, 0).contiguous()
        object.__setattr__(self, "out_by_mel", by_mel)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The arguments of `frontend_step` after the pools and slots, in its order."""
        return (self.cmvn_mean, self.cmvn_istd, self.conv1_weight, self.conv1_bias, self.conv2_weight,
                self.conv2_bias, self.out_weight, self.out_bias)  # fmt: skip


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
    h1 = causal_time_pad(x, conv1_cache[slots])
    h2 = causal_time_pad(F.silu(F.conv2d(h1, conv1_weight, conv1_bias, stride=2, padding=(0, 1))), conv2_cache[slots])
    b = F.silu(F.conv2d(h2, conv2_weight, conv2_bias, stride=2, padding=(0, 1)))
    conv1_cache.index_copy_(0, slots, h1[:, :, -1:])
    conv2_cache.index_copy_(0, slots, h2[:, :, -1:])
    return F.linear(b.permute(0, 2, 1, 3).flatten(2), out_weight, out_bias)


@triton.jit
def _silu(v, dtype: tl.constexpr):
    """silu(v rounded to dtype) in float32, as PyTorch's conv output in dtype then F.silu (round it to dtype)."""
    v = v.to(dtype).to(tl.float32)
    return v * tl.sigmoid(v)


@triton.jit
def _h1(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, r, cols, mask, M, dtype: tl.constexpr):
    """h1[r, cols] (any shape) in float32, rounded to dtype: the conv1 cache row for r = 0, else the normalized
    feature frame r - 1 of feats_ptr (T, M)."""
    cached = tl.load(cache1_ptr + cols, mask=mask & (r == 0), other=0.0).to(tl.float32)
    f = tl.load(feats_ptr + (r - 1) * M + cols, mask=mask & (r > 0), other=0.0)
    mean = tl.load(mean_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    istd = tl.load(istd_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(r == 0, cached, ((f - mean) * istd).to(dtype).to(tl.float32))


@triton.jit
def _plane_mel(i, PW: tl.constexpr):
    """The mel column at entry i of an h2 scratch row (C, 2 PW): plane 0 holds columns 2j, plane 1 columns 2j - 1
    (j = i % PW), so that each conv2 tap reads PW consecutive entries."""
    return 2 * (i % PW) - (i // PW) % 2


@triton.jit
def _conv1_rows(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, w1_ptr, b1_ptr, h2_ptr, s0, s_end, M, M1, C,
                ROWS: tl.constexpr, BLOCK_C: tl.constexpr, PW: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """h2 rows s + 1 for s0 <= s < min(s0 + ROWS, s_end) at h2_ptr + (s + 1) (C, 2 PW): silu(conv1) of h1 rows
    2s .. 2s + 2 at the mel columns of the plane layout (zero outside 0 .. M1 - 1), as an im2col tl.dot:
    conv1_weight (C, 9 taps padded to 16) @ A^T (16, ROWS 2 PW)."""
    dtype: tl.constexpr = h2_ptr.dtype.element_ty
    i = tl.arange(0, ROWS * 2 * PW)
    s, f = s0 + i // (2 * PW), _plane_mel(i, PW)
    f_ok = (f >= 0) & (f < M1)
    j = tl.arange(0, 16)  # tap 3 kt + kf
    cols = 2 * f[None, :] - 1 + (j % 3)[:, None]
    taps_ok = (f_ok & (s < s_end))[None, :] & (j < 9)[:, None] & (cols >= 0) & (cols < M)
    rows = 2 * s[None, :] + (j // 3)[:, None]
    a_t = _h1(feats_ptr, cache1_ptr, mean_ptr, istd_ptr, rows, cols, taps_ok, M, dtype)
    c = tl.arange(0, BLOCK_C)
    w = tl.load(w1_ptr + c[:, None] * 9 + j[None, :], mask=(c < C)[:, None] & (j < 9)[None, :], other=0.0)
    acc = tl.dot(w, a_t.to(dtype), input_precision=PRECISION)  # (BLOCK_C, ROWS 2 PW)
    acc += tl.load(b1_ptr + c, mask=c < C, other=0.0).to(tl.float32)[:, None]
    v = tl.where(f_ok[None, :], _silu(acc, dtype), 0.0).to(dtype)
    out = h2_ptr + (s[None, :] + 1) * (C * 2 * PW) + c[:, None] * (2 * PW) + (i % (2 * PW))[None, :]
    tl.store(out, v, mask=(c < C)[:, None] & (s < s_end)[None, :])


@triton.jit
def _conv2_tile(h2_ptr, w2_ptr, b2_ptr, x_ptr, m0, co0, co_size, n_frames, M2, C,
                BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, PW: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    """Output positions m0 .. m0 + BLOCK_M (m = t PW + g, t < n_frames, g < M2) of silu(conv2(h2)), channels
    co0 .. co0 + co_size, into x_ptr (n_frames, C M2), as an im2col tl.dot: conv2_weight (C, 9 C) rows co @ A^T
    (9 C, BLOCK_M) with A^T[k, m] = h2[2t + kt, ci, mel 2g - 1 + kf] for k = 9 ci + 3 kt + kf: scratch entry g
    (kf = 1, plane 0) or g + kf // 2 (plane 1), contiguous in g."""
    R = C * 2 * PW  # one h2 scratch row
    m = m0 + tl.arange(0, BLOCK_M)
    t, g = m // PW, m % PW
    m_ok = (t < n_frames) & (g < M2)
    co = co0 + tl.arange(0, BLOCK_CO)
    co_ok = (co < co0 + co_size) & (co < C)
    acc = tl.zeros((BLOCK_CO, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, 9 * C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < 9 * C
        kf = k % 3
        k_off = (k % 9 // 3) * R + (k // 9) * (2 * PW) + tl.where(kf == 1, 0, PW + kf // 2)
        a_t = tl.load(h2_ptr + k_off[:, None] + (2 * t * R + g)[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        w = tl.load(w2_ptr + co[:, None] * (9 * C) + k[None, :], mask=co_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(w, a_t, acc, input_precision=PRECISION)
    acc += tl.load(b2_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    v = _silu(acc, x_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + t[None, :] * (C * M2) + co[:, None] * M2 + g[None, :], v, mask=co_ok[:, None] & m_ok[None, :])


@triton.jit
def _conv_kernel(feats_ptr, cache1_ptr, cache2_ptr, slots_ptr, mean_ptr, istd_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                 h2_ptr, x_ptr, M, M1, M2, C, co_size,
                 L: tl.constexpr, FT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, PW: tl.constexpr, ROWS1: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """Program (b, j, q): frames t0 = q FT .. t0 + FT - 1 of stream b, conv2 channels j co_size ...: the h2 rows
    they read, 2 t0 .. 2 t0 + 2 FT, into its scratch (2 FT + 1, C, 2 PW), then conv2 into x rows b L + t0 ..."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(2) * FT
    slot = tl.load(slots_ptr + b)
    R = C * 2 * PW
    h2_ptr += ((b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)) * (2 * FT + 1) * R
    if t0 == 0:  # h2 row 0: the old conv2 cache row
        c = tl.arange(0, BLOCK_C)[:, None]
        i = tl.arange(0, 2 * PW)[None, :]
        f = _plane_mel(i, PW)
        row0 = tl.load(cache2_ptr + slot * C * M1 + c * M1 + f, mask=(c < C) & (f >= 0) & (f < M1), other=0.0)
        tl.store(h2_ptr + c * (2 * PW) + i, row0, mask=c < C)
    feats_ptr += b * (4 * L) * M
    s_end = tl.minimum(2 * t0 + 2 * FT, 2 * L)  # conv1 row s is h2 row s + 1, scratch row s + 1 - 2 t0
    for s0 in range(tl.maximum(2 * t0 - 1, 0), s_end, ROWS1):
        _conv1_rows(feats_ptr, cache1_ptr + slot * M, mean_ptr, istd_ptr, w1_ptr, b1_ptr, h2_ptr - 2 * t0 * R, s0,
                    s_end, M, M1, C, ROWS1, BLOCK_C, PW, PRECISION)  # fmt: skip
    tl.debug_barrier()  # the h2 scratch is written
    for m0 in range(0, FT * PW, BLOCK_M):
        _conv2_tile(h2_ptr, w2_ptr, b2_ptr, x_ptr + (b * L + t0) * C * M2, m0, tl.program_id(1) * co_size, co_size,
                    tl.minimum(FT, L - t0), M2, C, BLOCK_M, BLOCK_CO, BLOCK_K, PW, PRECISION)  # fmt: skip


@triton.jit
def _linear_tile(x_ptr, w_ptr, bias_ptr, out_ptr, pm, pn, R, K, D,
                 BLOCK_ML: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """Tile (pm, pn) of out_ptr (R, D) = x_ptr (R, K) @ w_ptr (D, K)^T + bias, rounded to out's dtype."""
    r = pm * BLOCK_ML + tl.arange(0, BLOCK_ML)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_ML, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + r[:, None] * K + k[None, :], mask=(r < R)[:, None] & (k < K)[None, :], other=0.0)
        w = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=(k < K)[:, None] & (n < D)[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    acc += tl.load(bias_ptr + n, mask=n < D, other=0.0).to(tl.float32)[None, :]
    out_mask = (r < R)[:, None] & (n < D)[None, :]
    tl.store(out_ptr + r[:, None] * D + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _write_caches(b, feats_ptr, h2_ptr, cache1_ptr, cache2_ptr, slots_ptr, mean_ptr, istd_ptr, M, M1, C, n_co, n_q,
                  FT, L: tl.constexpr, BLOCK_MEL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
                  PW: tl.constexpr):  # fmt: skip
    """Stream b's new cache rows: h1's last frame (the normalized feature frame 4L - 1) and h2's last row 2L (in the
    scratch of conv program (b, 0, n_q - 1), read out of the plane layout)."""
    dtype: tl.constexpr = cache1_ptr.dtype.element_ty
    slot = tl.load(slots_ptr + b)
    mel = tl.arange(0, BLOCK_MEL)
    x_last = _h1(feats_ptr + b * (4 * L) * M, cache1_ptr, mean_ptr, istd_ptr, 4 * L, mel, mel < M, M, dtype)
    tl.store(cache1_ptr + slot * M + mel, x_last.to(dtype), mask=mel < M)
    c = tl.arange(0, BLOCK_C)[:, None]
    f = tl.arange(0, BLOCK_F)[None, :]
    mask = (c < C) & (f < M1)
    t0 = (n_q - 1) * FT
    row = h2_ptr + ((b * n_co * n_q + n_q - 1) * (2 * FT + 1) + 2 * L - 2 * t0) * C * (2 * PW)
    last = tl.load(row + c * (2 * PW) + (f % 2) * PW + (f + 1) // 2, mask=mask)
    tl.store(cache2_ptr + slot * C * M1 + c * M1 + f, last, mask=mask)


@triton.jit
def _linear_kernel(x_ptr, wo_ptr, bo_ptr, out_ptr, feats_ptr, h2_ptr, cache1_ptr, cache2_ptr, slots_ptr, mean_ptr,
                   istd_ptr, R, K, D, M, M1, C, n_co, n_q, FT, n_n, n_tiles,
                   L: tl.constexpr, BLOCK_ML: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_MEL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, PW: tl.constexpr,
                   PRECISION: tl.constexpr):  # fmt: skip
    """Program i < n_tiles: tile (i // n_n, i % n_n) of the Linear; program n_tiles + b: stream b's cache rows."""
    i = tl.program_id(0)
    if i < n_tiles:
        _linear_tile(x_ptr, wo_ptr, bo_ptr, out_ptr, i // n_n, i % n_n, R, K, D, BLOCK_ML, BLOCK_N, BLOCK_K, PRECISION)
    else:
        _write_caches((i - n_tiles).to(tl.int64), feats_ptr, h2_ptr, cache1_ptr, cache2_ptr, slots_ptr, mean_ptr,
                      istd_ptr, M, M1, C, n_co, n_q, FT, L, BLOCK_MEL, BLOCK_C, BLOCK_F, PW)  # fmt: skip


def _check_shapes(feats, conv1_cache, conv2_cache, slots, cmvn_mean, cmvn_istd, weights) -> tuple[int, ...]:
    """Raise ValueError unless the shapes fit; returns (B, L, M, C, D)."""
    if feats.dim() != 3 or feats.shape[0] == 0 or feats.shape[1] % 4 or feats.shape[1] == 0:
        raise ValueError(f"feats must be (B, 4 L, n_mels) with B, L >= 1, got {tuple(feats.shape)}")
    b, t, m = feats.shape
    if t // 4 > MAX_FRAMES:
        raise ValueError(f"frontend_step takes 1 to {MAX_FRAMES} output frames (4 L feature frames), got L = "
                         f"{t // 4}; split longer input into several calls")  # fmt: skip
    c = weights["conv1_weight"].shape[0]
    m2 = halved(halved(m))
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
    if tuple(conv1_cache.shape) != (s, 1, 1, m) or tuple(conv2_cache.shape) != (s, c, 1, halved(m)):
        raise ValueError(f"conv1_cache and conv2_cache must be (S, 1, 1, {m}) and (S, {c}, 1, {halved(m)}), got "
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


@dataclass(frozen=True)
class Plan:
    """How one call is launched: conv programs per stream (n_co channel blocks x n_q frame blocks), the Linear's
    tiles (n_m x n_n), and each kernel's constexprs and launch options."""

    n_co: int
    co_size: int
    n_q: int
    n_m: int
    n_n: int
    conv: dict
    linear: dict


def plan(
    b: int,
    l: int,
    m: int,
    c: int,
    d: int,
    dtype: torch.dtype,
    sms: int,
    co_splits: int | None = None,
    frames_per_program: int | None = None,
) -> Plan:
    """The launch plan for B streams, L frames, M mels, C channels, d_model D, the model dtype and sms SMs.
    `co_splits` (n_co) and `frames_per_program` (FT) override the choice (bench/frontend_plan.py)."""
    n_co = co_splits if co_splits is not None else max(1, min(_MAX_CO_SPLITS, c, sms // b))
    co_size = triton.cdiv(c, n_co)
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is not used: the operands are 16-bit
    block_c, pw = max(16, triton.next_power_of_2(c)), triton.next_power_of_2(halved(halved(m)) + 1)
    many = b >= sms  # every SM has a stream: a program per stream, no splits
    ft = l if many else min(l, max(1, _TILE // pw))  # frames per conv program: split while SMs are idle
    ft = min(l, frames_per_program) if frames_per_program is not None else ft
    conv = dict(
        L=l, FT=ft, BLOCK_C=block_c, BLOCK_M=max(16, pw * min(triton.next_power_of_2(ft), max(1, _TILE // pw))),
        BLOCK_CO=max(16, triton.next_power_of_2(co_size)), BLOCK_K=_K_BLOCK, PW=pw, ROWS1=_CONV1_ROWS,
        PRECISION=precision, num_warps=_CONV_WARPS_MANY_STREAMS if many else _CONV_WARPS, num_stages=_CONV_STAGES,
    )  # fmt: skip
    rows = b * l
    block_ml = max(16, min(128 if dtype != torch.float32 else 64, triton.next_power_of_2(rows)))
    n_m = triton.cdiv(rows, block_ml)
    block_n = next((n for n in (128, 64) if n_m * triton.cdiv(d, n) >= sms // 2), 32)
    block_n = max(16, min(block_n, triton.next_power_of_2(d)))
    linear = dict(
        L=l, BLOCK_ML=block_ml, BLOCK_N=block_n, BLOCK_K=_K_BLOCK, BLOCK_MEL=triton.next_power_of_2(m),
        BLOCK_C=block_c, BLOCK_F=triton.next_power_of_2(halved(m)), PW=pw, PRECISION=precision,
        num_warps=8 if block_ml * block_n >= 128 * 128 else 4,
    )  # fmt: skip
    return Plan(n_co, co_size, triton.cdiv(l, ft), n_m, triton.cdiv(d, block_n), conv, linear)


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
    `slots` in place, in two launches. `check=False` skips `check_slots` (no device sync; the caller vouches)."""
    weights = dict(conv1_weight=conv1_weight, conv1_bias=conv1_bias, conv2_weight=conv2_weight,
                   conv2_bias=conv2_bias, out_weight=out_weight, out_bias=out_bias)  # fmt: skip
    pools = (feats, conv1_cache, conv2_cache, slots, cmvn_mean, cmvn_istd)
    b, l, m, c, d = _check_shapes(*pools, weights)
    _check_types(*pools, weights)
    if check:
        check_slots(slots, conv1_cache.shape[0])
    slots = slots.contiguous()  # the kernels read slots[b] at slots_ptr + b
    m1, m2 = halved(m), halved(halved(m))
    dtype, device = out_weight.dtype, feats.device
    p = plan(b, l, m, c, d, dtype, _sm_count(device))
    feats, cmvn_mean, cmvn_istd = feats.contiguous(), cmvn_mean.contiguous(), cmvn_istd.contiguous()
    w1, b1, w2, b2, wo, bo = (w.contiguous() for w in weights.values())
    ft, pw = p.conv["FT"], p.conv["PW"]
    h2 = torch.empty(b, p.n_co, p.n_q, 2 * ft + 1, c, 2 * pw, device=device, dtype=dtype)
    x = torch.empty(b * l, c * m2, device=device, dtype=dtype)
    out = torch.empty(b, l, d, device=device, dtype=dtype)
    _conv_kernel[(b, p.n_co, p.n_q)](
        feats, conv1_cache, conv2_cache, slots, cmvn_mean, cmvn_istd, w1, b1, w2, b2, h2, x, m, m1, m2, c,
        p.co_size, **p.conv,
    )  # fmt: skip
    n_tiles = p.n_m * p.n_n
    _linear_kernel[(n_tiles + b,)](
        x, wo, bo, out, feats, h2, conv1_cache, conv2_cache, slots, cmvn_mean, cmvn_istd, b * l, c * m2, d, m, m1,
        c, p.n_co, p.n_q, ft, p.n_n, n_tiles, **p.linear,
    )  # fmt: skip
    return out
