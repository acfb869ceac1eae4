"""A whole Mamba block's streaming step for a few streams, in two Triton launches.

`block_step` is `x + mixer(rms_norm(x))` for L (1..16) frames of B streams whose state lives in rows `slots` of a
preallocated pool, updated in place: the same function as `block_step_ref` below, which is the general path
(`add_rms_norm`, the in_proj GEMM, `kernels.step.step`'s three kernels, the out_proj GEMM). At one stream the step
is bound by launch latency, not by work, so this form does the block in two launches instead of six:

Kernel 1, `_block_in_kernel`, grid (B, H): program (b, h) computes u = rms_norm(x[b]) (L, d_model), then the
in_proj rows that head h needs, z and x (P each), B and C of its group (N each) and dt (1), rounded to the model
dtype as the GEMM's output is, into its scratch row raw (B, H, L, R) with R = 2 P + 2 N + 1. After a barrier it
runs, frame by frame, the causal conv + SiLU of its x, B and C channels (reading that scratch and the conv cache),
softplus(dt), the selective scan of its head's (P, N) state in float32 registers, y = S C + D x and the gate
y silu(z), into g (B, L, d_inner) float32. It stores the state once and shifts the conv cache of its own x
channels. Every head of a group computes the group's B and C again: at these sizes that is cheaper than a launch.

Kernel 2, `_block_out_kernel`, grid (B, d_model / BLOCK_O): program (b, j) normalizes g's rows (the gated
RMSNorm, rounded to the model dtype), multiplies them by BLOCK_O rows of out_proj and adds the residual:
x_out[b, :, j BLOCK_O ...] = x + out, rounded to the dtype. Program (b, 0) also shifts the conv cache of the B and C
channels, which kernel 1's programs of every head of the group read, so it is written only after they are done.

Shapes: B streams, L frames, S pool slots, H heads, P head_dim, g groups, N d_state, K conv width,
d_inner = H P, conv_dim = d_inner + 2 g N, d_in_proj = d_inner + conv_dim + H. x (B, L, d_model) in the weights'
dtype, conv_cache (S, conv_dim, K - 1) in that dtype, ssm_state (S, H, P, N) float32, slots (B,) int64 distinct.
The matrix products use tl.dot on at least 16 rows (float32 weights: "ieee" precision, never tf32), so P and N
must be powers of two of at least 16 (`fits`). No autotuning: the kernels write the pool in place.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from asr.ssm import rms_norm
from kernels.step import _check, _conv_silu, _shift_conv_cache, _softplus, step_ref

__all__ = ["block_step", "block_step_ref", "fits"]

_IN_WARPS, _OUT_WARPS = 4, 4
_BLOCK_D = 64  # d_model columns per in_proj dot
_BLOCK_I = 128  # d_inner columns per out_proj dot
_BLOCK_O = 32  # out_proj outputs per program of kernel 2


def block_step_ref(
    x, conv_cache, ssm_state, slots, norm_weight, in_proj, conv_weight, conv_bias, dt_bias, A_log, D,
    gate_norm_weight, out_proj, n_groups, head_dim, eps=1e-5, gate_eps=1e-5,
):  # fmt: skip
    """x (B, L, d_model) -> x + out_proj(step(in_proj(rms_norm(x)))) in x's dtype, advancing the pool rows `slots`."""
    zxbcdt = F.linear(rms_norm(x, norm_weight, eps), in_proj)
    args = (conv_weight, conv_bias, dt_bias, A_log, D, gate_norm_weight, n_groups, head_dim, gate_eps)
    y = step_ref(zxbcdt, conv_cache, ssm_state, slots, *args)
    return x + F.linear(y, out_proj)


def fits(head_dim: int, d_state: int) -> bool:
    """Whether `block_step` takes these dims: its dots need P and N to be powers of two, at least 16."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (head_dim, d_state))


@triton.jit
def _block_in_kernel(
    x_ptr, norm_w_ptr, w_in_ptr, conv_w_ptr, conv_b_ptr, dt_bias_ptr, A_log_ptr, D_ptr,
    cache_ptr, state_ptr, slots_ptr, raw_ptr, g_ptr,
    d_model, d_inner, conv_dim, n_heads, heads_per_group, n_groups, eps,
    L: tl.constexpr, K: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b, h): in_proj rows of head h for stream b, then conv, scan and gate of head h (module docstring)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + b)
    grp = h // heads_per_group
    R: tl.constexpr = 2 * P + 2 * N + 1
    raw = raw_ptr + (b * n_heads + h) * L * R
    rows = tl.arange(0, BLOCK_M)[:, None]
    x_row = x_ptr + b * L * d_model
    rstd = _rms_rstd(x_row, rows, d_model, eps, L, BLOCK_M, BLOCK_D)
    zi, xi = h * P, d_inner + h * P  # first in_proj row of each piece
    bi = 2 * d_inner + grp * N
    ci = bi + n_groups * N
    di = 2 * d_inner + 2 * n_groups * N + h
    acc_z = tl.zeros((BLOCK_M, P), dtype=tl.float32)
    acc_x = tl.zeros((BLOCK_M, P), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, N), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_M, N), dtype=tl.float32)
    acc_dt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk < d_model
        xv = tl.load(x_row + rows * d_model + kk[None, :], mask=(rows < L) & km[None, :], other=0.0)
        nw = tl.load(norm_w_ptr + kk, mask=km, other=0.0).to(tl.float32)
        u = (xv.to(tl.float32) * rstd * nw[None, :]).to(
            x_ptr.dtype.element_ty
        )  # rms_norm's output, as the GEMM sees it
        acc_z += _mm(u, _w_tile(w_in_ptr, zi, P, kk, km, d_model), PRECISION)
        acc_x += _mm(u, _w_tile(w_in_ptr, xi, P, kk, km, d_model), PRECISION)
        acc_b += _mm(u, _w_tile(w_in_ptr, bi, N, kk, km, d_model), PRECISION)
        acc_c += _mm(u, _w_tile(w_in_ptr, ci, N, kk, km, d_model), PRECISION)
        wd = tl.load(w_in_ptr + di * d_model + kk, mask=km, other=0.0).to(tl.float32)
        acc_dt += tl.sum(u.to(tl.float32) * wd[None, :], axis=1)
    dtype = raw_ptr.dtype.element_ty
    pp, nn = tl.arange(0, P)[None, :], tl.arange(0, N)[None, :]
    keep = rows < L
    tl.store(raw + rows * R + pp, acc_z.to(dtype), mask=keep)
    tl.store(raw + rows * R + P + pp, acc_x.to(dtype), mask=keep)
    tl.store(raw + rows * R + 2 * P + nn, acc_b.to(dtype), mask=keep)
    tl.store(raw + rows * R + 2 * P + N + nn, acc_c.to(dtype), mask=keep)
    tl.store(raw + tl.arange(0, BLOCK_M) * R + 2 * P + 2 * N, acc_dt.to(dtype), mask=tl.arange(0, BLOCK_M) < L)
    tl.debug_barrier()  # the scratch rows are written before any thread reads them back
    cache = cache_ptr + slot * conv_dim * (K - 1)
    p, n = tl.arange(0, P), tl.arange(0, N)
    ch_x, ch_b, ch_c = zi + p, bi - d_inner + n, ci - d_inner + n  # conv channels
    all_p, all_n = p < P, n < N
    s_off = (slot * n_heads + h) * P * N + p[:, None] * N + n[None, :]
    S = tl.load(state_ptr + s_off)
    A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
    Dh = tl.load(D_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    for t in tl.static_range(L):
        # _conv_silu reads frame j of channel c at ptr + j R + c: shift each base so that channel c lands on its column
        xt = _conv_silu(raw + P - zi, cache, conv_w_ptr, conv_b_ptr, ch_x, all_p, R, t, K)
        Bt = _conv_silu(raw + 2 * P - (bi - d_inner), cache, conv_w_ptr, conv_b_ptr, ch_b, all_n, R, t, K)
        Ct = _conv_silu(raw + 2 * P + N - (ci - d_inner), cache, conv_w_ptr, conv_b_ptr, ch_c, all_n, R, t, K)
        dt = _softplus(tl.load(raw + t * R + 2 * P + 2 * N).to(tl.float32) + dt_bias)
        z = tl.load(raw + t * R + p).to(tl.float32)
        S = S * tl.exp(dt * A) + (dt * xt)[:, None] * Bt[None, :]
        y = tl.sum(S * Ct[None, :], axis=1) + Dh * xt
        tl.store(g_ptr + (b * L + t) * d_inner + zi + p, y * z * tl.sigmoid(z))
    tl.store(state_ptr + s_off, S)
    _shift_conv_cache(raw + P - zi, cache, ch_x, all_p, R, L, K, BLOCK_K)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation. PRECISION "interpreter": operands upcast to float32 first, since Triton's
    interpreter returns garbage for 16-bit dots; the products of 16-bit values are exact in float32, so this is the
    same arithmetic as the tensor cores' 16-bit dot."""
    if PRECISION == "interpreter":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _rms_rstd(x_row, rows, d_model, eps, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """1 / rms of each of the L rows (d_model wide) at x_row, as a (BLOCK_M, 1) float32 column."""
    ss = tl.zeros((BLOCK_M, 1), dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)[None, :]
        v = tl.load(x_row + rows * d_model + kk, mask=(rows < L) & (kk < d_model), other=0.0).to(tl.float32)
        ss += tl.sum(v * v, axis=1, keep_dims=True)
    return tl.rsqrt(ss / d_model + eps)


@triton.jit
def _w_tile(w_ptr, first_row, WIDTH: tl.constexpr, kk, km, row_len):
    """Rows first_row ... first_row + WIDTH of a row-major weight, columns kk, transposed: (len(kk), WIDTH)."""
    r = first_row + tl.arange(0, WIDTH)[None, :]
    return tl.load(w_ptr + r * row_len + kk[:, None], mask=km[:, None], other=0.0)


@triton.jit
def _block_out_kernel(
    x_ptr, g_ptr, gate_w_ptr, w_out_ptr, out_ptr, cache_ptr, slots_ptr, raw_ptr,
    d_model, d_inner, conv_dim, n_heads, heads_per_group, n_groups, eps,
    L: tl.constexpr, K: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b, j): gated RMSNorm of g[b], out_proj rows j BLOCK_O ..., residual add; (b, 0) shifts B, C's cache."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)[:, None]
    keep = rows < L
    g_row = g_ptr + b * L * d_inner
    rstd = _rms_rstd(g_row, rows, d_inner, eps, L, BLOCK_M, BLOCK_I)
    oc = j * BLOCK_O + tl.arange(0, BLOCK_O)
    om = oc < d_model
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    dtype = x_ptr.dtype.element_ty
    for k0 in range(0, d_inner, BLOCK_I):
        kk = k0 + tl.arange(0, BLOCK_I)
        km = kk < d_inner
        gv = tl.load(g_row + rows * d_inner + kk[None, :], mask=keep & km[None, :], other=0.0)
        gw = tl.load(gate_w_ptr + kk, mask=km, other=0.0).to(tl.float32)
        a = (gv * rstd * gw[None, :]).to(dtype)  # the gated norm's output, as the GEMM sees it
        w = tl.load(w_out_ptr + oc[None, :] * d_inner + kk[:, None], mask=km[:, None] & om[None, :], other=0.0)
        acc += _mm(a, w, PRECISION)
    cols = oc[None, :]
    x = tl.load(x_ptr + (b * L + rows) * d_model + cols, mask=keep & om[None, :], other=0.0)
    x_new = (x.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype)  # PyTorch's add of two dtype tensors
    tl.store(out_ptr + (b * L + rows) * d_model + cols, x_new, mask=keep & om[None, :])
    if j == 0:
        slot = tl.load(slots_ptr + b)
        cache = cache_ptr + slot * conv_dim * (K - 1)
        R: tl.constexpr = 2 * P + 2 * N + 1
        n = tl.arange(0, N)
        for grp in range(n_groups):  # group grp's B and C sit in the scratch row of its first head
            raw = raw_ptr + (b * n_heads + grp * heads_per_group) * L * R
            first_b = d_inner + grp * N  # conv channel of B[0]; C's follow n_groups N later
            first_c = first_b + n_groups * N
            _shift_conv_cache(raw + 2 * P - first_b, cache, first_b + n, n < N, R, L, K, BLOCK_K)
            _shift_conv_cache(raw + 2 * P + N - first_c, cache, first_c + n, n < N, R, L, K, BLOCK_K)


def block_step(
    x, conv_cache, ssm_state, slots, norm_weight, in_proj, conv_weight, conv_bias, dt_bias, A_log, D,
    gate_norm_weight, out_proj, n_groups, head_dim, eps=1e-5, gate_eps=1e-5, check=True,
):  # fmt: skip
    """The Triton form of `block_step_ref`: returns x + mixer(rms_norm(x)) (B, L, d_model) and updates the pool rows
    `slots` in place. `check=False` skips `check_slots` (no device sync; the caller vouches for the slots)."""
    if x.dim() != 3 or in_proj.dim() != 2:
        raise ValueError(f"x must be (B, L, d_model) and in_proj 2-D, got {tuple(x.shape)}, {tuple(in_proj.shape)}")
    b, l, d_model = x.shape
    zxbcdt_like = torch.empty_strided((b, l, in_proj.shape[0]), (0, 0, 0), device=x.device, dtype=x.dtype)
    args = (conv_weight, conv_bias, dt_bias, A_log, D, gate_norm_weight)
    d_inner, conv_dim, h, n, k = _check(zxbcdt_like, conv_cache, ssm_state, slots, *args, n_groups, head_dim, check)
    _check_linear("in_proj", in_proj, d_inner + conv_dim + h, d_model, x)
    _check_linear("out_proj", out_proj, d_model, d_inner, x)
    if tuple(norm_weight.shape) != (d_model,):
        raise ValueError(f"norm_weight must have shape ({d_model},), got {tuple(norm_weight.shape)}")
    if not fits(head_dim, n):
        raise ValueError(f"block_step needs head_dim and d_state to be powers of two >= 16, got {head_dim}, {n}")
    x, norm_weight, in_proj, out_proj, gate_norm_weight, conv_weight, conv_bias, dt_bias, A_log, D = (
        t.contiguous()
        for t in (x, norm_weight, in_proj, out_proj, gate_norm_weight, conv_weight, conv_bias, dt_bias, A_log, D)
    )
    raw = torch.empty(b, h, l, 2 * head_dim + 2 * n + 1, device=x.device, dtype=x.dtype)
    g = torch.empty(b, l, d_inner, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    block_m = max(16, triton.next_power_of_2(l))
    precision = _precision(x.dtype)
    block_k = triton.next_power_of_2(k - 1)
    block_d = min(_BLOCK_D, triton.next_power_of_2(d_model))
    shared = (d_model, d_inner, conv_dim, h, h // n_groups, n_groups)
    _block_in_kernel[(b, h)](
        x, norm_weight, in_proj, conv_weight, conv_bias, dt_bias, A_log, D, conv_cache, ssm_state, slots, raw, g,
        *shared, eps, L=l, K=k, P=head_dim, N=n, BLOCK_M=block_m, BLOCK_D=block_d,
        BLOCK_K=block_k, PRECISION=precision, num_warps=_IN_WARPS,
    )  # fmt: skip
    block_o = min(_BLOCK_O, triton.next_power_of_2(d_model))
    _block_out_kernel[(b, triton.cdiv(d_model, block_o))](
        x, g, gate_norm_weight, out_proj, out, conv_cache, slots, raw, *shared, gate_eps,
        L=l, K=k, P=head_dim, N=n, BLOCK_M=block_m, BLOCK_I=min(_BLOCK_I, triton.next_power_of_2(d_inner)),
        BLOCK_O=block_o, BLOCK_K=block_k, PRECISION=precision, num_warps=_OUT_WARPS,
    )  # fmt: skip
    return out


def _precision(dtype: torch.dtype) -> str:
    """The dots' PRECISION: "ieee" for float32 (never tf32, which changes results); for 16-bit operands, where
    Triton ignores it, "tf32" (its default)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_linear(name: str, w: torch.Tensor, rows: int, cols: int, x: torch.Tensor) -> None:
    if tuple(w.shape) != (rows, cols):
        raise ValueError(f"{name} must have shape ({rows}, {cols}), got {tuple(w.shape)}")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got {w.dtype}, {w.device}")
