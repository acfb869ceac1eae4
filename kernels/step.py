"""One streaming step of a Mamba-2 mixer on a slot pool, as three Triton kernels.

Same function as `step_ref` below: everything `Mamba2Mixer._run` does between in_proj and out_proj, for L
(1..16) frames of B streams whose state lives in rows `slots` of a preallocated pool, updated in place.

Shapes: B streams, L frames, S pool slots, H heads, P head_dim, g groups (head j reads group j // (H // g)),
N d_state, K conv width, d_inner = H P, conv_dim = d_inner + 2 g N, d_in_proj = d_inner + conv_dim + H.
zxbcdt (B, L, d_in_proj) = [z (d_inner) | x (d_inner) | B (g N) | C (g N) | dt (H)], conv_cache (S, conv_dim, K - 1)
in zxbcdt's dtype, ssm_state (S, H, P, N) float32, slots (B,) int64 distinct.

Kernel 1, `_step_conv_kernel`, grid (B, conv_dim / BLOCK_C): the causal depthwise conv + SiLU of one block of
channels for all L frames as one (L, BLOCK_C) tile, into a scratch xbc (B, L, conv_dim), float32 (or the model dtype
for kernel 2's chunked form), the K taps from the conv cache row for t + k < K - 1 and from zxbcdt after (vector
loads along the channels: the wrapper tells the kernel the largest power of two up to 16 dividing zxbcdt's rows
`ALIGN`); then the shift of those
channels' cache to the last K - 1 inputs (all reads of the old row come before a barrier, the writes after: for
L < K - 1 the new row keeps part of the old). Channel blocks are disjoint, so no program reads cache that another
writes. Block 0 also writes dt = softplus(dt + dt_bias) (B, L, H) float32.

Kernel 2, `_step_scan_kernel`, grid (B, H, P / BLOCK_P): one program per BLOCK_P rows of one head's state of one
stream. It loads its (BLOCK_P, N) state slice ONCE into float32 registers and, for each frame t (unrolled, L is a
constexpr),

    S = exp(dt A) S + dt x B^T        y = S C + D x

then stores the state ONCE and the L rows of y (pre-norm, float32) together at the end. Nothing is stored inside
the frame loop, so the compiler may issue every frame's loads up front; with the conv done by kernel 1 the loop
loads only x, B, C and dt. The shapes are too small for tl.dot (one frame at a time): broadcasts and tl.sum, all
in float32 (no tf32).

Kernel 2 in the chunked form, `_step_ssd_kernel`, for half-precision models from `_SSD_MIN_FRAMES` frames: the same
tiles (b, h, i), taken in turn by `_SSD_PROGRAMS_PER_SM` persistent programs an SM, each loading its next tile while it
computes this one (`tl.range(num_stages=_SSD_STAGES)`: cp.async into shared memory), and for each tile the L frames as
one chunk of the chunked scan (`kernels/ssd_scan._fwd_chunk`, frames padded to 16 with dt = 0),

    y = (mask * C B^T) @ (dt x) + exp(a) (C @ S0^T) + D x       S1 = exp(a_L) S0 + (dt x exp(a_L - a))^T @ B

as four tl.dots on tensor cores with TF32 inputs and float32 sums (the offline forward's Triton scan rounds the
same way); the state is still read and written once, in float32. At 1,024 streams of 16 frames the graphed encoder
step took 3,555 us against 4,717 frame by frame (3,124 us once persistent and pipelined); from 4 frames down the
per-frame kernel is faster (its cost grows with the frames, this one's barely) (bench/step_ssd.py, BENCHMARKS.md).
Float32 models keep the per-frame kernel: their sums are float32 throughout, never TF32.

Kernel 3, `_step_norm_kernel`, grid (B,): the gated RMSNorm over the whole d_inner of the stream's L rows,
out = rmsnorm(y * silu(z)) * norm_weight, in zxbcdt's dtype.

The pool is addressed through slots[b]: no gather or scatter, rows outside `slots` are untouched.
`step` checks the slots (range and distinctness, a device sync) unless told the caller did (`check=False`, as
under CUDA graph capture). Rows that share a slot race; a caller that pads a batch points every pad row at one
spare slot whose contents it never reads.
No autotuning: the kernels write the pool in place, so a tuning rerun would advance the state twice. The launch
settings below were chosen by hand on the H200 (bench/step_warps.py, BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from asr.ssm import causal_conv1d, gated_rms_norm, ssm_scan_ref
from kernels.ssd_scan import _fwd_chunk, _interpreting, _load_rows

__all__ = ["step", "step_ref", "check_slots", "MAX_FRAMES"]

MAX_FRAMES = 16  # L is a constexpr (the frame loop is unrolled): at most this many frames per call
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CONV_BLOCK, _CONV_WARPS = 128, 2  # conv kernel: channels per program (BENCHMARKS.md, sessions 12 and 13)
_SCAN_ROWS, _SCAN_WARPS = 16, 2  # scan kernel: state rows per program; the graphed encoder step at batch 1024 x
# 8 frames took 3,043 us against 3,544 us at 64 rows (one program per head) (bench/step_warps.py, BENCHMARKS.md)
_NORM_WARPS = 8  # norm kernel: up to (16, d_inner) rows in one program
# From this many frames a half-precision step takes `_step_ssd_kernel` (the chunked form, TF32 tl.dots on tensor
# cores) instead of `_step_scan_kernel`; its state rows a tile and warps (bench/step_ssd.py, BENCHMARKS.md)
_SSD_MIN_FRAMES = 8
_SSD_ROWS, _SSD_WARPS = 16, 1
# the chunked kernel is persistent: this many programs an SM (0: a program a tile) take its tiles in turn, each
# loading its next tile's state, x, B and C while it computes (software pipelining, _SSD_STAGES deep); 24 an SM
# (about 11 resident) measured best from 256 streams x 16 frames up (bench/step_ssd.py, BENCHMARKS.md session 13)
_SSD_PROGRAMS_PER_SM, _SSD_STAGES = 24, 2


def step_ref(
    zxbcdt,
    conv_cache,
    ssm_state,
    slots,
    conv_weight,
    conv_bias,
    dt_bias,
    A_log,
    D,
    norm_weight,
    n_groups,
    head_dim,
    eps=1e-5,
):
    """The step in PyTorch on the gathered rows `slots`, written back in place. Returns y (B, L, d_inner)."""
    b, l, _ = zxbcdt.shape
    h = dt_bias.numel()
    d_inner, conv_dim = h * head_dim, conv_weight.shape[0]
    n = (conv_dim - d_inner) // (2 * n_groups)
    z, xbc, dt = zxbcdt.split([d_inner, conv_dim, h], dim=-1)
    xbc, cache = causal_conv1d(xbc, conv_weight, conv_bias, conv_cache[slots])
    x, B, C = xbc.split([d_inner, n_groups * n, n_groups * n], dim=-1)
    x = x.reshape(b, l, h, head_dim)
    dt = F.softplus(dt.float() + dt_bias.float())
    A = -torch.exp(A_log.float())
    y, state = ssm_scan_ref(
        x, dt, A, B.reshape(b, l, n_groups, n), C.reshape(b, l, n_groups, n), initial_state=ssm_state[slots]
    )
    conv_cache.index_copy_(0, slots, cache.to(conv_cache.dtype))
    ssm_state.index_copy_(0, slots, state)
    y = y + x.float() * D.float()[:, None]
    return gated_rms_norm(y.reshape(b, l, d_inner), z, norm_weight, eps).to(zxbcdt.dtype)


@triton.jit
def _aligned(n, ALIGN: tl.constexpr):
    """n, known to the compiler as a multiple of ALIGN (the wrapper chose ALIGN to divide it), so that loads along rows
    n elements apart can be issued as vectors."""
    return (n // ALIGN) * ALIGN


@triton.jit
def _softplus(v):
    """torch's softplus (threshold 20)."""
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def _step_conv_kernel(
    zx_ptr,
    cache_ptr,
    slots_ptr,
    w_ptr,
    bias_ptr,
    dt_bias_ptr,
    xbc_ptr,
    dt_ptr,
    d_in_proj,
    d_inner,
    conv_dim,
    n_heads,
    L: tl.constexpr,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Program (b, j): conv + SiLU of channels j BLOCK_C ... into xbc_ptr (B, L, conv_dim), their cache shift;
    j = 0 also dt (B, L, H). The L frames are one (BLOCK_L, BLOCK_C) tile: tap k reads input column t + k of
    cat(cache row, frames), the K taps' loads all issued before the sums."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    slot = tl.load(slots_ptr + b)
    d_in_proj = _aligned(d_in_proj, ALIGN)
    ch = j * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = ch < conv_dim
    row = zx_ptr + b * L * d_in_proj
    cache = cache_ptr + slot * conv_dim * (K - 1)
    t = tl.arange(0, BLOCK_L)[:, None]
    c, m = ch[None, :], mask[None, :] & (t < L)
    bias = tl.load(bias_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + ch * K + k, mask=mask, other=0.0).to(tl.float32)
        src = t + k - (K - 1)  # the frame tap k of frame t reads; before frame 0: cache column src + K - 1
        acc += w[None, :] * tl.load(row + d_inner + src * d_in_proj + c, mask=m & (src >= 0), other=0.0).to(tl.float32)
        for j in tl.static_range(min(K - 1 - k, L)):  # frame j's tap k: cache column j + k
            old = tl.load(cache + ch * (K - 1) + j + k, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(t == j, w[None, :] * old[None, :], 0.0)
    tl.store(xbc_ptr + (b * L + t) * conv_dim + c, (acc * tl.sigmoid(acc)).to(xbc_ptr.dtype.element_ty), mask=m)
    _shift_conv_cache(row + d_inner, cache, ch, mask, d_in_proj, L, K, BLOCK_K)
    if j == 0:
        rows = tl.arange(0, BLOCK_L)[:, None]
        hh = tl.arange(0, BLOCK_H)[None, :]
        hm = (rows < L) & (hh < n_heads)
        dt = tl.load(row + rows * d_in_proj + d_inner + conv_dim + hh, mask=hm, other=0.0).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + hh, mask=hh < n_heads, other=0.0).to(tl.float32)
        tl.store(dt_ptr + (b * L + rows) * n_heads + hh, _softplus(dt + dt_bias), mask=hm)


@triton.jit
def _shift_conv_cache(
    xbc_ptr, cache_ptr, ch, mask, row_stride, L: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Rewrite channels ch of a conv cache row (conv_dim, K - 1) to the last K - 1 inputs of cat(old row, L frames
    of xbc_ptr)."""
    c = ch[:, None]
    j = tl.arange(0, BLOCK_K)[None, :]
    src = L + j  # column of cat(old row, frames): < K - 1 is the old row, else frame src - (K - 1)
    valid = mask[:, None] & (j < K - 1)
    old = tl.load(cache_ptr + c * (K - 1) + src, mask=valid & (src < K - 1), other=0.0)
    new = tl.load(xbc_ptr + (src - (K - 1)) * row_stride + c, mask=valid & (src >= K - 1), other=0.0)
    tl.debug_barrier()  # every thread has read the old row (here and in the conv) before any writes it
    tl.store(cache_ptr + c * (K - 1) + j, tl.where(src < K - 1, old, new), mask=valid)


@triton.jit
def _state_slice(slots_ptr, b, h, i, n_heads, heads_per_group, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (b, h, i) of a scan kernel: head h's group, its state rows rp and columns rn, and the offsets and mask of
    its (BLOCK_P, BLOCK_N) slice of the pool row slots[b]."""
    rp = i * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    s_off = (tl.load(slots_ptr + b) * n_heads + h) * P * N + rp[:, None] * N + rn[None, :]
    return h // heads_per_group, rp, rn, s_off, (rp[:, None] < P) & (rn[None, :] < N)


@triton.jit
def _step_scan_kernel(
    xbc_ptr,
    dt_ptr,
    state_ptr,
    slots_ptr,
    A_log_ptr,
    D_ptr,
    y_ptr,
    d_inner,
    conv_dim,
    n_heads,
    heads_per_group,
    n_groups,
    P,
    N,
    L: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Program (b, h, i): rows i BLOCK_P ... of head h's state of stream b over L frames; y pre-norm into y_ptr."""
    b, h, i = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    grp, rp, rn, s_off, s_mask = _state_slice(slots_ptr, b, h, i, n_heads, heads_per_group, P, N, BLOCK_P, BLOCK_N)
    tt = tl.arange(0, BLOCK_L)
    mp, mn = rp < P, rn < N
    S = tl.load(state_ptr + s_off, mask=s_mask, other=0.0)
    A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
    Dh = tl.load(D_ptr + h).to(tl.float32)
    Y = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)  # column t: frame t's y
    for t in tl.static_range(L):
        frame = xbc_ptr + (b * L + t) * conv_dim
        x = tl.load(frame + h * P + rp, mask=mp, other=0.0).to(tl.float32)
        Bt = tl.load(frame + d_inner + grp * N + rn, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(frame + d_inner + (n_groups + grp) * N + rn, mask=mn, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + (b * L + t) * n_heads + h)
        S = S * tl.exp(dt * A) + (dt * x)[:, None] * Bt[None, :]
        y = tl.sum(S * Ct[None, :], axis=1) + Dh * x
        Y = tl.where(tt[None, :] == t, y[:, None], Y)
    y_mask = mp[:, None] & (tt[None, :] < L)
    tl.store(y_ptr + (b * L + tt[None, :]) * d_inner + h * P + rp[:, None], Y, mask=y_mask)
    tl.store(state_ptr + s_off, S, mask=s_mask)


@triton.jit
def _step_ssd_kernel(
    xbc_ptr,
    dt_ptr,
    state_ptr,
    slots_ptr,
    A_log_ptr,
    D_ptr,
    y_ptr,
    d_inner,
    conv_dim,
    n_heads,
    heads_per_group,
    n_groups,
    P,
    N,
    n_tiles,
    L: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Tiles (b, h, i) of `_step_scan_kernel`'s grid, taken in turn (persistent: program j takes tiles j, j + G, ...
    of n_tiles, G programs; the loads of the next tile issued while this one computes, STAGES deep), each with the L
    frames as one chunk of `_fwd_chunk` (tl.dots on tensor cores; frames padded to BLOCK_L >= 16 with dt = 0, which
    leaves the state as it is)."""
    n_p = tl.cdiv(P, BLOCK_P)
    t = tl.arange(0, BLOCK_L)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        b, h, i = tile // (n_heads * n_p), tile // n_p % n_heads, tile % n_p
        grp, rp, rn, s_off, s_mask = _state_slice(slots_ptr, b, h, i, n_heads, heads_per_group, P, N, BLOCK_P,
                                                  BLOCK_N)  # fmt: skip
        frames = xbc_ptr + b * L * conv_dim
        x = _load_rows(frames + h * P, t, L, conv_dim, rp, P)
        Bt = _load_rows(frames + d_inner + grp * N, t, L, conv_dim, rn, N)
        Ct = _load_rows(frames + d_inner + (n_groups + grp) * N, t, L, conv_dim, rn, N)
        dt = tl.load(dt_ptr + (b * L + t) * n_heads + h, mask=t < L, other=0.0)
        S = tl.load(state_ptr + s_off, mask=s_mask, other=0.0)
        A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
        y, S = _fwd_chunk(x, dt, A, Bt, Ct, S, BLOCK_L, PRECISION)
        y += tl.load(D_ptr + h).to(tl.float32) * x
        y_mask = (t[:, None] < L) & (rp[None, :] < P)
        tl.store(y_ptr + (b * L + t[:, None]) * d_inner + h * P + rp[None, :], y, mask=y_mask)
        tl.store(state_ptr + s_off, S, mask=s_mask)


@triton.jit
def _step_norm_kernel(
    y_ptr,
    zx_ptr,
    norm_w_ptr,
    out_ptr,
    d_in_proj,
    d_inner,
    eps,
    L: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Program b: out[b] = rmsnorm(y[b] * silu(z[b])) * norm_w over d_inner (L rows)."""
    b = tl.program_id(0)
    d_in_proj = _aligned(d_in_proj, ALIGN)
    t = tl.arange(0, BLOCK_L)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (t < L) & (d < d_inner)
    y = tl.load(y_ptr + (b * L + t) * d_inner + d, mask=mask, other=0.0)
    z = tl.load(zx_ptr + (b * L + t) * d_in_proj + d, mask=mask, other=0.0).to(tl.float32)
    gated = y * z * tl.sigmoid(z)
    rstd = tl.rsqrt(tl.sum(gated * gated, axis=1) / d_inner + eps)
    w = tl.load(norm_w_ptr + d, mask=d < d_inner, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * L + t) * d_inner + d, gated * rstd[:, None] * w, mask=mask)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (sizes the grids); 1 elsewhere (the interpreter)."""
    return (
        _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 1
    )


def _check(
    zxbcdt,
    conv_cache,
    ssm_state,
    slots,
    conv_weight,
    conv_bias,
    dt_bias,
    A_log,
    D,
    norm_weight,
    n_groups,
    head_dim,
    check_values: bool,
):
    """Raise ValueError unless the arguments fit together; returns (d_inner, conv_dim, n_heads, d_state, K)."""
    if zxbcdt.dim() != 3:
        raise ValueError(f"zxbcdt must be (B, L, d_in_proj), got shape {tuple(zxbcdt.shape)}")
    b, l, d_in_proj = zxbcdt.shape
    if not 1 <= l <= MAX_FRAMES:
        raise ValueError(f"step takes 1 to {MAX_FRAMES} frames (L), got {l}; split longer input into several calls")
    if b == 0:
        raise ValueError("zxbcdt has no streams (B = 0)")
    if dt_bias.dim() != 1 or head_dim <= 0 or n_groups <= 0 or dt_bias.numel() % n_groups:
        raise ValueError(
            f"dt_bias must be (n_heads,) with n_heads a multiple of n_groups={n_groups}, and head_dim={head_dim} > 0; "
            f"got dt_bias {tuple(dt_bias.shape)}"
        )
    h = dt_bias.numel()
    d_inner = h * head_dim
    if conv_weight.dim() != 2 or conv_weight.shape[1] < 2:
        raise ValueError(f"conv_weight must be (conv_dim, K) with K >= 2, got {tuple(conv_weight.shape)}")
    conv_dim, k = conv_weight.shape
    n, rem = divmod(conv_dim - d_inner, 2 * n_groups)
    if n <= 0 or rem:
        raise ValueError(
            f"conv_dim={conv_dim} must be d_inner + 2 n_groups d_state = {d_inner} + {2 * n_groups} d_state"
        )
    if d_in_proj != d_inner + conv_dim + h:
        raise ValueError(
            f"zxbcdt's last dim must be d_inner + conv_dim + n_heads = {d_inner + conv_dim + h}, got {d_in_proj}"
        )
    if conv_cache.dim() != 3 or conv_cache.shape[1:] != (conv_dim, k - 1):
        raise ValueError(f"conv_cache must be (S, {conv_dim}, {k - 1}), got {tuple(conv_cache.shape)}")
    s = conv_cache.shape[0]
    if tuple(ssm_state.shape) != (s, h, head_dim, n):
        raise ValueError(f"ssm_state must be (S, H, P, N) = {(s, h, head_dim, n)}, got {tuple(ssm_state.shape)}")
    expected = {"conv_bias": (conv_dim,), "A_log": (h,), "D": (h,), "norm_weight": (d_inner,)}
    named = {"conv_bias": conv_bias, "A_log": A_log, "D": D, "norm_weight": norm_weight}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(named[name].shape)}")
    pool = {"conv_cache": conv_cache, "ssm_state": ssm_state, "slots": slots}
    for name, t in {**pool, "conv_weight": conv_weight, "dt_bias": dt_bias, **named}.items():
        if t.device != zxbcdt.device:
            raise ValueError(f"all tensors must be on one device: zxbcdt is on {zxbcdt.device}, {name} on {t.device}")
    if zxbcdt.device.type != "cuda" and not _interpreting():
        raise ValueError(f"step needs CUDA tensors (or TRITON_INTERPRET=1), got {zxbcdt.device}")
    _check_pool(zxbcdt, conv_cache, ssm_state)
    if slots.dtype != torch.int64 or tuple(slots.shape) != (b,):
        raise ValueError(f"slots must be int64 of shape ({b},), got {slots.dtype} {tuple(slots.shape)}")
    if check_values:
        check_slots(slots, s)
    return d_inner, conv_dim, h, n, k


def _check_pool(zxbcdt, conv_cache, ssm_state):
    if zxbcdt.dtype not in _DTYPES:
        raise ValueError(f"zxbcdt must be float32, bfloat16 or float16, got {zxbcdt.dtype}")
    if conv_cache.dtype != zxbcdt.dtype:
        raise ValueError(f"conv_cache must have zxbcdt's dtype {zxbcdt.dtype}, got {conv_cache.dtype}")
    if ssm_state.dtype != torch.float32:
        raise ValueError(f"ssm_state must be float32, got {ssm_state.dtype}")
    for name, t in (("conv_cache", conv_cache), ("ssm_state", ssm_state)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")


def check_slots(slots: torch.Tensor, pool_size: int) -> None:
    """Raise ValueError unless `slots` (B,) are distinct indices of a pool of `pool_size` rows (a device sync)."""
    lo, hi = slots.min().item(), slots.max().item()
    if lo < 0 or hi >= pool_size:
        raise ValueError(f"slots must index the pool of {pool_size} slots, got values in [{lo}, {hi}]")
    if torch.unique(slots).numel() != slots.numel():
        raise ValueError(f"slots must be distinct, got {slots.tolist()}")


def step(
    zxbcdt,
    conv_cache,
    ssm_state,
    slots,
    conv_weight,
    conv_bias,
    dt_bias,
    A_log,
    D,
    norm_weight,
    n_groups,
    head_dim,
    eps=1e-5,
    check=True,
):
    """The Triton form of `step_ref`: returns y (B, L, d_inner) and updates the pool rows `slots` in place.
    `check=False` skips `check_slots` (no device sync; the caller vouches for the slots)."""
    args = (zxbcdt, conv_cache, ssm_state, slots, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight)
    d_inner, conv_dim, h, n, k = _check(*args, n_groups, head_dim, check)
    b, l, d_in_proj = zxbcdt.shape
    zxbcdt, slots, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight = (
        t.contiguous() for t in (zxbcdt, slots, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight)
    )  # the kernels read slots[b] at slots_ptr + b
    f32 = dict(device=zxbcdt.device, dtype=torch.float32)
    ssd = zxbcdt.dtype != torch.float32 and l >= _SSD_MIN_FRAMES  # fp32 weights: float32 sums throughout, no tf32
    # the chunked form reads the conv's output rounded to the model dtype, as `step_ref`'s is (less traffic); the
    # per-frame scan reads it in float32 (its scalar bf16 loads measured slower)
    xbc = torch.empty(b, l, conv_dim, device=zxbcdt.device, dtype=zxbcdt.dtype if ssd else torch.float32)
    dt = torch.empty(b, l, h, **f32)
    y = torch.empty(b, l, d_inner, **f32)
    out = torch.empty(b, l, d_inner, device=zxbcdt.device, dtype=zxbcdt.dtype)
    block_l = triton.next_power_of_2(l)
    align = math.gcd(d_in_proj, 16)  # zxbcdt's rows start at multiples of this: vector loads along them
    _step_conv_kernel[(b, triton.cdiv(conv_dim, _CONV_BLOCK))](
        zxbcdt, conv_cache, slots, conv_weight, conv_bias, dt_bias, xbc, dt, d_in_proj, d_inner, conv_dim, h,
        L=l, K=k, BLOCK_C=_CONV_BLOCK, BLOCK_K=triton.next_power_of_2(k - 1), BLOCK_L=block_l,
        BLOCK_H=triton.next_power_of_2(h), ALIGN=align, num_warps=_CONV_WARPS,
    )  # fmt: skip
    scan_args = (xbc, dt, ssm_state, slots, A_log, D, y, d_inner, conv_dim, h, h // n_groups, n_groups, head_dim, n)
    if ssd:
        block_p = min(_SSD_ROWS, max(16, triton.next_power_of_2(head_dim)))  # tl.dot: at least 16
        n_tiles = b * h * triton.cdiv(head_dim, block_p)
        programs = min(n_tiles, _SSD_PROGRAMS_PER_SM * _sm_count(zxbcdt.device)) if _SSD_PROGRAMS_PER_SM else n_tiles
        _step_ssd_kernel[(programs,)](
            *scan_args, n_tiles, L=l, BLOCK_P=block_p, BLOCK_N=max(16, triton.next_power_of_2(n)),
            BLOCK_L=max(16, block_l), PRECISION="ieee" if _interpreting() else "tf32", STAGES=_SSD_STAGES,
            num_warps=_SSD_WARPS,
        )  # fmt: skip
    else:
        block_p = min(_SCAN_ROWS, triton.next_power_of_2(head_dim))
        _step_scan_kernel[(b, h, triton.cdiv(head_dim, block_p))](
            *scan_args, L=l, BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(n), BLOCK_L=block_l,
            num_warps=_SCAN_WARPS,
        )  # fmt: skip
    _step_norm_kernel[(b,)](
        y, zxbcdt, norm_weight, out, d_in_proj, d_inner, eps,
        L=l, BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d_inner), ALIGN=align, num_warps=_NORM_WARPS,
    )  # fmt: skip
    return out
