"""One frame of the whole encoder for a few streams in ONE launch, as matrix-vector products: every Mamba layer, norm_f
and the head. What the streaming step runs for one encoder frame (a live caption stream stepping 40 ms at a time).

Same function as `frame_step_ref` below (`encoder_step_ref` for L = 1). `kernels/encoder_step.py` does the same for
B L <= 16 rows with tl.dots over rows padded to 16; for one row that pads 15 of 16, and its per-program chain of
layout changes and scratch round trips measured 103 us at 1 x 1 where this form takes 64 (BENCHMARKS.md, session 15).

Stream b gets NP = H ceil(P / BLOCK_P) programs (grid (NP, B)), BLOCK_P chosen by the wrapper as small as the SMs
allow (4 for one stream on an H200: 128 programs); program q = (h, i) owns state rows i BLOCK_P ... of head h. It
keeps the residual x (D,) as float32 holding model-dtype values, in two halves (even and odd columns), because the
weights of in_proj, out_proj (transposed: `EncoderWeights.out_proj_t`) and the head are read as packed column pairs
(two bf16 in an int32, two float32 in an int64): one load and two FMAs a pair. For layer l, its weight tiles, conv
taps, cache rows and state slice are loaded before it waits for layer l - 1 (the loads overlap the wait), then:
  1. x += out_proj of layer l - 1 from the layer's float32 accumulators; h = rms_norm(x) norm_l;
  2. its rows of in_proj as float32 matrix-vector products (z and x of its channels, B and C of its group, dt of
     its head), each rounded to the model dtype as a GEMM's output is;
  3. the causal depthwise conv + SiLU of those channels from the conv cache row and the new inputs, in registers;
  4. S = exp(dt A) S + dt x B^T, y = S C + D x on its state slice (float32, loaded and stored once);
  5. g = y silu(z). Since out_proj(rms_norm(g) w) = rsqrt(mean(g^2) + eps) W_out (g w), it adds
     W_out[:, its channels] (g w) (D values) and sum(g^2) into an accumulator row of layer l (atomics; row q %
     _COPIES of the layer's, which halves the atomics each address serializes), arrives at the layer's grid
     barrier, and only then stores its state slice and its x channels' cache row (off the critical path: the
     barrier's release need not wait for them).
B and C belong to a group of heads, so every program of the group computes them; the group's first program shifts
their cache rows once every program has read them: after the barrier of layer l, with layer l + 1's stores.
After the last layer program 0 of each stream applies norm_f and the head.

The barrier is `kernels/encoder_step.py`'s: a counter per stream and layer, zeroed with the accumulators by one
memset a call; every program must be resident at once (`frame_step` refuses a grid larger than the SM count).
Triton's interpreter runs programs one after another, so a barrier would never return there: the interpreter (and
`persistent=False`) launches one phase at a time, each launch starting from x and replaying the residual adds of
the layers before, and the group's first program computing layer l - 1's B and C again for their cache rows.

Rounding follows the per-layer path: in_proj's outputs, out_proj's and each residual sum in the model dtype; the SSM
state and every sum float32 (no tf32). As in `kernels/encoder_step.py`, the gated norm's input to out_proj is
rounded before its scale is applied, and the conv's pre-SiLU sum is not rounded.

Shapes: as `kernels/encoder_step.py` with L = 1: x (B, 1, D) with D even, float32 or bfloat16; pools conv (NL, S, CD,
K - 1) and ssm (NL, S, H, P, N); slots (B,) distinct but for pad rows sharing one spare slot. No autotuning: the
launch writes the pools in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.encoder_step import EncoderWeights, _arrive, _check, _wait, encoder_step_ref
from kernels.step import _interpreting, _sm_count, _softplus, check_slots

__all__ = ["frame_step", "frame_step_ref", "block_p_for", "takes"]

_WARPS = 8  # H200, 12 x 256, bf16, 128 programs: 2 warps 132 us, 4 68, 8 59 (BENCHMARKS.md, session 15)
_MIN_BLOCK_P = 4
_DTYPES = (torch.float32, torch.bfloat16)  # the packed column pairs' (float16 takes kernels/encoder_step.py)
# Accumulator rows a layer, program q adding into row q % _COPIES: fewer atomics a row to serialize. H200, 1 x 1, 12 x 256
# bf16: 1 row 62.9 us, 2 60.0, 4 60.3, 8 63.6; at 4 x 1 no gain (86.1, 86.5; BENCHMARKS.md session 16)
_COPIES = tl.constexpr(2)


def frame_step_ref(
    x: torch.Tensor, w: EncoderWeights, conv: torch.Tensor, ssm: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """x (B, 1, D) -> logits (B, 1, V): `encoder_step_ref` for one frame, advancing pool rows `slots` in place."""
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"frame_step takes one frame a stream, x (B, 1, D), got shape {tuple(x.shape)}")
    return encoder_step_ref(x, w, conv, ssm, slots)


@triton.jit
def _halves_of(ptr, jj, jmask):
    """The even and odd entries (BLOCK_J,) of the vector at ptr, float32."""
    return (tl.load(ptr + 2 * jj, mask=jmask, other=0.0).to(tl.float32),
            tl.load(ptr + 2 * jj + 1, mask=jmask, other=0.0).to(tl.float32))  # fmt: skip


@triton.jit
def _rms(xe, xo, we, wo, eps, dtype: tl.constexpr, D: tl.constexpr):
    """rms_norm(x) w from the even and odd halves (BLOCK_J,) of x and w: the same halves, rounded to the model dtype."""
    rstd = tl.rsqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / D + eps)
    return (xe * rstd * we).to(dtype).to(tl.float32), (xo * rstd * wo).to(dtype).to(tl.float32)


@triton.jit
def _wrows(w_ptr, rows, rmask, jj, jmask, J: tl.constexpr):
    """Rows `rows` of a weight matrix viewed as column pairs (., J) at w_ptr: (len(rows), BLOCK_J) packed pairs."""
    return tl.load(w_ptr + rows[:, None] * J + jj[None, :], mask=rmask[:, None] & jmask[None, :], other=0)


@triton.jit
def _halves(w):
    """Packed column pairs -> (even, odd) columns, float32: two bf16 in an int32, or two float32 in an int64."""
    if w.dtype == tl.int32:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:
        lo = w.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _matvec(w, he, ho, dtype: tl.constexpr):
    """w (C, BLOCK_J) packed pairs @ h (even and odd halves) -> (C,) float32 holding the value rounded to dtype (a
    GEMM's output)."""
    lo, hi = _halves(w)
    return tl.sum(lo * he[None, :] + hi * ho[None, :], axis=1).to(dtype).to(tl.float32)


@triton.jit
def _taps(cache_row, cw_ptr, ch, cmask, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """For conv channels ch: the cache row's K - 1 inputs (C, BLOCK_K), the same shifted by one (column K - 2 to be the
    new input), their taps (C, BLOCK_K) and the new input's tap (C,), float32 (masked columns zero)."""
    kk = tl.arange(0, BLOCK_K)
    kmask = cmask[:, None] & (kk[None, :] < K - 1)
    old = tl.load(cache_row + ch[:, None] * (K - 1) + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
    shift = kmask & (kk[None, :] < K - 2)
    nxt = tl.load(cache_row + ch[:, None] * (K - 1) + kk[None, :] + 1, mask=shift, other=0.0).to(tl.float32)
    w_old = tl.load(cw_ptr + ch[:, None] * K + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
    w_new = tl.load(cw_ptr + ch * K + K - 1, mask=cmask, other=0.0).to(tl.float32)
    return old, nxt, w_old, w_new


@triton.jit
def _conv(v, old, w_old, w_new, bias):
    """SiLU of the causal depthwise conv at the new frame, whose input is v (C,). float32."""
    acc = bias + tl.sum(w_old * old, axis=1) + w_new * v
    return acc * tl.sigmoid(acc)


@triton.jit
def _new_cache(v, nxt, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The cache row after the frame: its last K - 2 inputs, then v. (C, BLOCK_K) float32."""
    kk = tl.arange(0, BLOCK_K)
    return tl.where(kk[None, :] == K - 2, v[:, None], nxt)


@triton.jit
def _store_cache(cache_row, ch, cmask, rows, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write rows (C, BLOCK_K) as channels ch of a conv cache row."""
    kk = tl.arange(0, BLOCK_K)
    tl.store(cache_row + ch[:, None] * (K - 1) + kk[None, :], rows.to(cache_row.dtype.element_ty),
             mask=cmask[:, None] & (kk[None, :] < K - 1))  # fmt: skip


@triton.jit
def _write_bc(conv_ptr, layer, S, slot, is_writer, bch, cch, nmask, bc_rows, cc_rows, CD: tl.constexpr,
              K: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The group's first program (is_writer) writes the new B and C conv cache rows of `layer` (every program of the
    group has read the old ones once the layer's barrier is passed)."""
    if is_writer:
        c_row = conv_ptr + (layer * S + slot) * CD * (K - 1)
        _store_cache(c_row, bch, nmask, bc_rows, K, BLOCK_K)
        _store_cache(c_row, cch, nmask, cc_rows, K, BLOCK_K)


@triton.jit
def _add_mixer(xe, xo, acc_row, SYNC_WAIT: tl.constexpr, bar_ptr, eps, dtype: tl.constexpr, NP: tl.constexpr,
               DI: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    """x + out_proj of a layer from its _COPIES accumulator rows at acc_row (each: the D values as even then odd
    halves, then the sum of squares), after its barrier if SYNC_WAIT: out rounded to the model dtype, then the sum,
    as PyTorch's are."""
    if SYNC_WAIT:
        _wait(bar_ptr, NP)
    jj = tl.arange(0, BLOCK_J)
    aw: tl.constexpr = 2 * BLOCK_J + 2
    acc_e = tl.load(acc_row + jj, cache_modifier=".cg")
    acc_o = tl.load(acc_row + BLOCK_J + jj, cache_modifier=".cg")
    sum_sq = tl.load(acc_row + 2 * BLOCK_J, cache_modifier=".cg")
    for c in tl.static_range(1, _COPIES):
        acc_e += tl.load(acc_row + c * aw + jj, cache_modifier=".cg")
        acc_o += tl.load(acc_row + c * aw + BLOCK_J + jj, cache_modifier=".cg")
        sum_sq += tl.load(acc_row + c * aw + 2 * BLOCK_J, cache_modifier=".cg")
    rs = tl.rsqrt(sum_sq / DI + eps)
    xe = (xe + (acc_e * rs).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    xo = (xo + (acc_o * rs).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return xe, xo


@triton.jit
def _frame_kernel(x_ptr, out_ptr, slots_ptr, conv_ptr, ssm_ptr, norm_ptr, in_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr,
                  dskip_ptr, gnorm_ptr, outw_ptr, normf_ptr, hw_ptr, hb_ptr, acc_ptr, bar_ptr, S, first, last, eps,
                  NL: tl.constexpr, D: tl.constexpr, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                  G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, SYNC: tl.constexpr):  # fmt: skip
    """Phases first .. last of stream b = program_id(1) (module docstring): phase l loads layer l's tiles, then
    finishes layer l - 1 (after its barrier if SYNC) and runs layer l; phase NL ends with the head. in_ptr, hw_ptr
    and outw_ptr (out_proj transposed) point at those weights as column pairs; acc_ptr at (B, NL, _COPIES,
    2 BLOCK_J + 2) float32, bar_ptr at (B, NL) int32."""
    q, b = tl.program_id(0), tl.program_id(1)
    n_rb: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    NP: tl.constexpr = H * n_rb
    DI: tl.constexpr = H * P
    CD: tl.constexpr = DI + 2 * G * N
    J: tl.constexpr = D // 2
    AW: tl.constexpr = _COPIES * (2 * BLOCK_J + 2)  # a layer's accumulator rows
    h = q // n_rb
    grp = h // (H // G)
    is_writer = q % (n_rb * (H // G)) == 0  # the group's first program: it shifts the B and C cache rows
    dtype = x_ptr.dtype.element_ty
    jj = tl.arange(0, BLOCK_J)
    jmask = jj < J
    rp = (q % n_rb) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = rp < P
    nn = tl.arange(0, BLOCK_N)
    nmask = nn < N
    xch, bch, cch = h * P + rp, DI + grp * N + nn, DI + (G + grp) * N + nn  # conv channels
    slot = tl.load(slots_ptr + b)
    accs, bars = acc_ptr + b * NL * AW, bar_ptr + b * NL  # the stream's
    xe, xo = _halves_of(x_ptr + b * D, jj, jmask)
    for layer in range(0, first - 1):  # launched phase by phase: the residual adds before phase first - 1's
        xe, xo = _add_mixer(xe, xo, accs + layer * AW, False, bars, eps, dtype, NP, DI, BLOCK_J)
    bc_rows = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # layer l - 1's new B and C cache rows (the writer's)
    cc_rows = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for phase in range(first, last + 1):
        layer = tl.minimum(phase, NL - 1)  # the last phase loads (and leaves) the last layer's tiles
        w_in = in_ptr + layer * (DI + CD + H) * J
        w_z = _wrows(w_in, h * P + rp, pmask, jj, jmask, J)
        w_x = _wrows(w_in, DI + h * P + rp, pmask, jj, jmask, J)
        w_b = _wrows(w_in, 2 * DI + grp * N + nn, nmask, jj, jmask, J)
        w_c = _wrows(w_in, 2 * DI + (G + grp) * N + nn, nmask, jj, jmask, J)
        w_dt = tl.load(w_in + (DI + CD + h) * J + jj, mask=jmask, other=0)
        w_out = _wrows(outw_ptr + layer * DI * J, xch, pmask, jj, jmask, J)  # W_out^T rows of its channels
        cache = conv_ptr + (layer * S + slot) * CD * (K - 1)
        cw, cb = cw_ptr + layer * CD * K, cb_ptr + layer * CD
        x_old, x_nxt, xw_old, xw_new = _taps(cache, cw, xch, pmask, K, BLOCK_K)
        b_old, b_nxt, bw_old, bw_new = _taps(cache, cw, bch, nmask, K, BLOCK_K)
        c_old, c_nxt, cw_old, cw_new = _taps(cache, cw, cch, nmask, K, BLOCK_K)
        s_ptr = ssm_ptr + ((layer * S + slot) * H + h) * P * N + rp[:, None] * N + nn[None, :]
        s_mask = pmask[:, None] & nmask[None, :]
        state = tl.load(s_ptr, mask=s_mask & (phase < NL), other=0.0)
        nw_e, nw_o = _halves_of(norm_ptr + layer * D, jj, jmask)  # every load before the wait: after it each
        x_bias = tl.load(cb + xch, mask=pmask, other=0.0).to(tl.float32)  # would be a round trip on the chain
        b_bias = tl.load(cb + bch, mask=nmask, other=0.0).to(tl.float32)
        c_bias = tl.load(cb + cch, mask=nmask, other=0.0).to(tl.float32)
        dt_bias = tl.load(dtb_ptr + layer * H + h).to(tl.float32)
        A = -tl.exp(tl.load(alog_ptr + layer * H + h).to(tl.float32))
        d_skip = tl.load(dskip_ptr + layer * H + h).to(tl.float32)
        gw = tl.load(gnorm_ptr + layer * DI + xch, mask=pmask, other=0.0).to(tl.float32)
        bc_prev, cc_prev = bc_rows, cc_rows
        if phase > 0:
            if not SYNC:  # launched phase by phase: layer phase - 1's B and C cache rows, computed again
                prev = phase - 1
                pw_e, pw_o = _halves_of(norm_ptr + prev * D, jj, jmask)
                he, ho = _rms(xe, xo, pw_e, pw_o, eps, dtype, D)
                w_prev = in_ptr + prev * (DI + CD + H) * J
                c_prev = conv_ptr + (prev * S + slot) * CD * (K - 1)
                vb = _matvec(_wrows(w_prev, 2 * DI + grp * N + nn, nmask, jj, jmask, J), he, ho, dtype)
                vc = _matvec(_wrows(w_prev, 2 * DI + (G + grp) * N + nn, nmask, jj, jmask, J), he, ho, dtype)
                bc_prev = _new_cache(vb, _taps(c_prev, cw_ptr, bch, nmask, K, BLOCK_K)[1], K, BLOCK_K)
                cc_prev = _new_cache(vc, _taps(c_prev, cw_ptr, cch, nmask, K, BLOCK_K)[1], K, BLOCK_K)
            xe, xo = _add_mixer(xe, xo, accs + (phase - 1) * AW, SYNC, bars + phase - 1, eps, dtype, NP, DI, BLOCK_J)
        if phase < NL:
            he, ho = _rms(xe, xo, nw_e, nw_o, eps, dtype, D)
            z = _matvec(w_z, he, ho, dtype)
            vx = _matvec(w_x, he, ho, dtype)
            vb = _matvec(w_b, he, ho, dtype)
            vc = _matvec(w_c, he, ho, dtype)
            dt_lo, dt_hi = _halves(w_dt)
            dt_raw = tl.sum(dt_lo * he + dt_hi * ho, axis=0).to(dtype).to(tl.float32)
            xc = _conv(vx, x_old, xw_old, xw_new, x_bias)
            bc = _conv(vb, b_old, bw_old, bw_new, b_bias)
            cc = _conv(vc, c_old, cw_old, cw_new, c_bias)
            x_rows = _new_cache(vx, x_nxt, K, BLOCK_K)
            bc_rows = _new_cache(vb, b_nxt, K, BLOCK_K)
            cc_rows = _new_cache(vc, c_nxt, K, BLOCK_K)
            dt = _softplus(dt_raw + dt_bias)
            state = state * tl.exp(dt * A) + (dt * xc)[:, None] * bc[None, :]
            y = tl.sum(state * cc[None, :], axis=1) + d_skip * xc
            g = y * z * tl.sigmoid(z)
            gn = (g * gw).to(dtype).to(tl.float32)[:, None]
            out_lo, out_hi = _halves(w_out)
            acc_row = accs + layer * AW + (q % _COPIES) * (2 * BLOCK_J + 2)
            tl.atomic_add(acc_row + jj, tl.sum(out_lo * gn, axis=0), sem="relaxed")  # zero where not jmask
            tl.atomic_add(acc_row + BLOCK_J + jj, tl.sum(out_hi * gn, axis=0), sem="relaxed")
            tl.atomic_add(acc_row + 2 * BLOCK_J, tl.sum(g * g, axis=0), sem="relaxed")
            if SYNC:
                _arrive(bars + layer)
            tl.store(s_ptr, state, mask=s_mask)  # the stores after the arrival: its release need not wait for them
            _store_cache(cache, xch, pmask, x_rows, K, BLOCK_K)
            if phase > 0:
                _write_bc(conv_ptr, phase - 1, S, slot, is_writer, bch, cch, nmask, bc_prev, cc_prev, CD, K, BLOCK_K)
        else:
            _write_bc(conv_ptr, phase - 1, S, slot, is_writer, bch, cch, nmask, bc_prev, cc_prev, CD, K, BLOCK_K)
            if q == 0:
                fw_e, fw_o = _halves_of(normf_ptr, jj, jmask)
                he, ho = _rms(xe, xo, fw_e, fw_o, eps, dtype, D)
                vv = tl.arange(0, BLOCK_V)
                vmask = vv < V
                logits = _matvec(_wrows(hw_ptr, vv, vmask, jj, jmask, J), he, ho, tl.float32)
                logits += tl.load(hb_ptr + vv, mask=vmask, other=0.0).to(tl.float32)
                tl.store(out_ptr + b * V + vv, logits.to(dtype), mask=vmask)


def block_p_for(w: EncoderWeights, streams: int, device: torch.device) -> int | None:
    """The state rows a program (a power of two, at least 4) for `streams` streams in one launch: the fewest whose
    grid fits on the SMs at once (the interpreter: the fewest); None if none does."""
    if device.type != "cuda":
        return _MIN_BLOCK_P
    h, p = w.dt_bias.shape[1], w.head_dim
    block_p, sms = _MIN_BLOCK_P, _sm_count(device)
    while streams * h * triton.cdiv(p, block_p) > sms:
        if block_p >= triton.next_power_of_2(p):
            return None
        block_p *= 2
    return block_p


def takes(x: torch.Tensor, w: EncoderWeights) -> bool:
    """Whether `frame_step` takes x (B, L, D): one frame (L = 1), D even, float32 or bfloat16, and a grid for B
    streams that fits on the device."""
    return (
        x.dim() == 3
        and x.shape[1] == 1
        and x.shape[2] % 2 == 0
        and x.dtype in _DTYPES
        and block_p_for(w, x.shape[0], x.device) is not None
    )


def _packed(t: torch.Tensor) -> torch.Tensor:
    """A contiguous matrix (..., C) viewed as column pairs: two bf16 in an int32, two float32 in an int64."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.bfloat16 else torch.int64)


def frame_step(
    x: torch.Tensor,
    w: EncoderWeights,
    conv: torch.Tensor,
    ssm: torch.Tensor,
    slots: torch.Tensor,
    check: bool = True,
    persistent: bool | None = None,
    block_p: int | None = None,
    num_warps: int = _WARPS,
) -> torch.Tensor:
    """The Triton form of `frame_step_ref`: logits (B, 1, V) in x's dtype, the pool rows `slots` advanced in place.
    `check=False` skips `check_slots` (no device sync; the caller vouches, as under CUDA graph capture).
    `persistent` (default: except in the interpreter) runs one launch with grid barriers, else a launch a phase.
    `block_p` (default `block_p_for`): state rows a program, a power of two."""
    _check(x, w, conv, ssm, slots)
    if x.shape[1] != 1 or x.shape[2] % 2 or x.dtype not in _DTYPES:
        raise ValueError(
            f"frame_step takes one frame a stream, x (B, 1, D) with D even, float32 or bfloat16; got "
            f"{tuple(x.shape)} {x.dtype}"
        )
    if check:
        check_slots(slots, conv.shape[1])
    persistent = not _interpreting() if persistent is None else persistent
    b, _, d = x.shape
    nl, s, h, p, n = ssm.shape
    block_p = block_p if block_p is not None else block_p_for(w, b, x.device)
    if block_p is None or block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two (or {b} streams fit no grid on this device), got {block_p}")
    n_programs = h * triton.cdiv(p, block_p)
    if persistent and x.device.type == "cuda" and b * n_programs > _sm_count(x.device):
        raise ValueError(f"{b} x {n_programs} programs do not fit on {_sm_count(x.device)} SMs at once")
    k, v = w.conv_weight.shape[2], w.head_weight.shape[0]
    block_j = triton.next_power_of_2(d // 2)
    n_acc = b * nl * _COPIES * (2 * block_j + 2)
    work = torch.zeros(n_acc + b * nl, device=x.device, dtype=torch.int32)  # one memset: accumulators, counters
    out = torch.empty(b, 1, v, device=x.device, dtype=x.dtype)
    consts = dict(
        NL=nl, D=d, H=h, P=p, N=n, G=w.n_groups, K=k, V=v, BLOCK_J=block_j, BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(n), BLOCK_K=triton.next_power_of_2(k - 1),
        BLOCK_V=triton.next_power_of_2(v), num_warps=num_warps,
    )  # fmt: skip
    tensors = [t.contiguous() for t in w.tensors()]
    tensors[1], tensors[8], tensors[10] = _packed(w.in_proj), _packed(w.out_proj_t), _packed(w.head_weight)
    args = (x.contiguous(), out, slots.contiguous(), conv, ssm, *tensors, work[:n_acc].view(torch.float32),
            work[n_acc:], s)  # fmt: skip
    phases = [(0, nl)] if persistent else [(i, i) for i in range(nl + 1)]
    for first, last in phases:
        _frame_kernel[(n_programs, b)](*args, first, last, w.eps, SYNC=persistent, **consts)
    return out
