"""One frame of the whole model for a few streams in ONE launch, as matrix-vector products: CMVN, the front end
(two 3x3 stride-2 convs and the Linear), every Mamba layer, norm_f and the head, from 4 raw log-mel frames to the
logits. What the streaming step runs for one encoder frame (a live caption stream stepping 40 ms at a time).

Same function as `frame_step_ref` below (`frontend_step_ref`, then `encoder_step_ref` for L = 1).
`kernels/encoder_step.py` does the layers for B L <= 16 rows with tl.dots over rows padded to 16; for one row that
pads 15 of 16, and its per-program chain of layout changes and scratch round trips measured 103 us at 1 x 1 where
this form took 64 for the layers alone (BENCHMARKS.md, session 15). Taking the front end in as well saves its two
launches (17 us at 1 x 1) for a phase of about 4 us (session 16).

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

Before layer 0 comes the front end's phase, with a barrier of its own. Its work items are (mel position m, block of
CB conv2 output channels), M2 C / CB of them, item i on program i % NP. An item computes the conv1 outputs (all C
channels, two rows, the three mel columns conv2 reads at m) from the normalized feature frames and the conv1 cache
row, then conv2 + SiLU for its channels, then their share of the Linear: `FrontEndWeights.out_by_mel[m]` rows (its
channels) times the conv2 outputs, added into the front end's accumulator row. After the barrier x = those sums +
the bias. The new cache rows (the last normalized frame; the last conv1 output row, a mel column a program) are
written in phase 0, when every program has read the old ones.

The barrier is `kernels/encoder_step.py`'s: a counter per stream and layer, in the caller's zeroed workspace with
the accumulators, which the one launch leaves zeroed for the next call (no memset a call); every program must be
resident at once (`frame_step` refuses a grid larger than the SM count).
Triton's interpreter runs programs one after another, so a barrier would never return there: the interpreter (and
`persistent=False`) launches one phase at a time, each launch taking x from the front end's accumulators and
replaying the residual adds of the layers before, and the group's first program computing layer l - 1's B and C
again for their cache rows.

Rounding follows the per-layer path: in_proj's outputs, out_proj's and each residual sum in the model dtype; the SSM
state and every sum float32 (no tf32). As in `kernels/encoder_step.py`, the gated norm's input to out_proj is
rounded before its scale is applied, and the conv's pre-SiLU sum is not rounded.

The front end rounds where PyTorch does (the normalized features, each conv's output and its SiLU, the Linear's
output), its sums float32.

Shapes: feats (B, 4, M) float32 raw log-mel; the model float32 or bfloat16 with D even; the front end's pools
conv1 (S, 1, 1, M) and conv2 (S, C, 1, M1), M1 = ceil(M / 2), M2 = ceil(M1 / 2) (`kernels/frontend.py`), the
layers' conv (NL, S, CD, K - 1) and ssm (NL, S, H, P, N) (`kernels/encoder_step.py`); slots (B,) distinct but for
pad rows sharing one spare slot. No autotuning: the launch writes the pools in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asr.features import SUBSAMPLING
from asr.ssm import halved
from kernels.encoder_step import EncoderWeights, _arrive, _check, _wait, encoder_step_ref
from kernels.frontend import _check_shapes, _check_types, _h1, _silu, frontend_step_ref
from kernels.step import _interpreting, _sm_count, _softplus, check_slots

__all__ = ["frame_step", "frame_step_ref", "block_p_for", "takes", "work_words"]

_WARPS = 8  # H200, 12 x 256, bf16, 128 programs: 2 warps 132 us, 4 68, 8 59 (BENCHMARKS.md, session 15)
_MIN_BLOCK_P = 4
_DTYPES = (torch.float32, torch.bfloat16)  # the packed column pairs' (float16 takes kernels/encoder_step.py)
# Accumulator rows a layer, program q adding into row q % _COPIES: fewer atomics a row to serialize. H200, 1 x 1,
# 12 x 256 bf16, the layers alone: 1 row 62.9 us, 2 60.0, 4 60.3, 8 63.6; at 4 x 1 no gain (86.1, 86.5; BENCHMARKS.md
# session 16). The whole model, session 17: 1 row 70.3 us, 2 66.0, 4 67.3, 8 73.2
_COPIES = tl.constexpr(2)


def frame_step_ref(
    feats: torch.Tensor,
    w: EncoderWeights,
    conv1: torch.Tensor,
    conv2: torch.Tensor,
    conv: torch.Tensor,
    ssm: torch.Tensor,
    slots: torch.Tensor,
    log_probs: bool = False,
) -> torch.Tensor:
    """feats (B, 4, n_mels) -> logits (B, 1, V): `frontend_step_ref`, then `encoder_step_ref`, advancing pool rows
    `slots` of the front end's (conv1, conv2) and the layers' (conv, ssm) pools in place. With `log_probs`, their
    log-softmax in float32 instead."""
    if feats.dim() != 3 or feats.shape[1] != SUBSAMPLING:
        raise ValueError(f"frame_step takes one encoder frame a stream, feats (B, {SUBSAMPLING}, n_mels), got shape "
                         f"{tuple(feats.shape)}")  # fmt: skip
    x = frontend_step_ref(feats, conv1, conv2, slots, *w.front.tensors())
    logits = encoder_step_ref(x, w, conv, ssm, slots)
    return logits.float().log_softmax(-1) if log_probs else logits


@triton.jit
def _halves_of(ptr, jj, jmask):
    """The even and odd entries (BLOCK_J,) of the vector at ptr, float32."""
    return (tl.load(ptr + 2 * jj, mask=jmask, other=0.0).to(tl.float32),
            tl.load(ptr + 2 * jj + 1, mask=jmask, other=0.0).to(tl.float32))  # fmt: skip


@triton.jit
def _rms(xe, xo, we, wo, eps, dtype: tl.constexpr, D: tl.constexpr):
    """rms_norm(x) w from the even and odd halves (BLOCK_J,) of x and w: the same halves, rounded to the model dtype.
    One reduction over both halves: 1.1-1.3 us a call faster than two (H100, 1 x 1; BENCHMARKS.md, session 19)."""
    rstd = tl.rsqrt(tl.sum(xe * xe + xo * xo, axis=0) / D + eps)
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
def _sum_copies(acc_row, off, BLOCK: tl.constexpr, CS):
    """The sum over the _COPIES accumulator rows (CS floats apart) at acc_row of entries off .. off + BLOCK."""
    ii = off + tl.arange(0, BLOCK)
    total = tl.load(acc_row + ii, cache_modifier=".cg")
    for c in tl.static_range(1, _COPIES):
        total += tl.load(acc_row + c * CS + ii, cache_modifier=".cg")
    return total


@triton.jit
def _zero_exchange(accs, bars, idx, LS, CS, AWC: tl.constexpr):
    """Zero exchange idx of the stream (its _COPIES accumulator rows of AWC floats and its barrier counter), for the
    next call: only once every program is past that barrier's wait and done reading the accumulators."""
    ii = tl.arange(0, triton.next_power_of_2(AWC))
    for c in tl.static_range(_COPIES):
        tl.store(accs + idx * LS + c * CS + ii, 0.0, mask=ii < AWC)
    tl.store(bars + idx, 0)


@triton.jit
def _last_to_leave(exit_ptr, NP: tl.constexpr):
    """Whether this program is the stream's last to pass this point (every program calls it once a launch): its
    earlier reads are done before the count, and the last one's later writes come after every program's count."""
    tl.debug_barrier()
    return tl.atomic_add(exit_ptr, 1, sem="acq_rel", scope="gpu") == NP - 1


@triton.jit
def _head(out_ptr, xe, xo, normf_ptr, hw_ptr, hb_ptr, jj, jmask, eps, dtype: tl.constexpr, D: tl.constexpr,
          J: tl.constexpr, V: tl.constexpr, BLOCK_V: tl.constexpr, LOG_PROBS: tl.constexpr):  # fmt: skip
    """norm_f and the head at out_ptr (V,): the logits in the model dtype, or (LOG_PROBS) their log-softmax in
    float32, as `logits.float().log_softmax(-1)` gives it."""
    fw_e, fw_o = _halves_of(normf_ptr, jj, jmask)
    he, ho = _rms(xe, xo, fw_e, fw_o, eps, dtype, D)
    vv = tl.arange(0, BLOCK_V)
    vmask = vv < V
    logits = _matvec(_wrows(hw_ptr, vv, vmask, jj, jmask, J), he, ho, tl.float32)
    logits += tl.load(hb_ptr + vv, mask=vmask, other=0.0).to(tl.float32)
    if LOG_PROBS:
        logits = tl.where(vmask, logits.to(dtype).to(tl.float32), -float("inf"))
        top = tl.max(logits, axis=0)
        logits -= top + tl.log(tl.sum(tl.exp(logits - top), axis=0))
    tl.store(out_ptr + vv, logits.to(out_ptr.dtype.element_ty), mask=vmask)


@triton.jit
def _add_mixer(xe, xo, acc_row, CS, SYNC_WAIT: tl.constexpr, bar_ptr, eps, dtype: tl.constexpr, NP: tl.constexpr,
               DI: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    """x + out_proj of a layer from its _COPIES accumulator rows at acc_row (each: the D values as even then odd
    halves, then the sum of squares), after its barrier if SYNC_WAIT: out rounded to the model dtype, then the sum,
    as PyTorch's are."""
    if SYNC_WAIT:
        _wait(bar_ptr, NP)
    acc_e = _sum_copies(acc_row, 0, BLOCK_J, CS)
    acc_o = _sum_copies(acc_row, BLOCK_J, BLOCK_J, CS)
    sum_sq = tl.sum(_sum_copies(acc_row, 2 * BLOCK_J, 2, CS), axis=0)  # the second entry is never written
    rs = tl.rsqrt(sum_sq / DI + eps)
    xe = (xe + (acc_e * rs).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    xo = (xo + (acc_o * rs).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return xe, xo


@triton.jit
def _conv1_at(feats_row, c1_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, ci, cmask, r, c, M, M1,
              dtype: tl.constexpr):  # fmt: skip
    """Row r + 1 of h2 at mel column c, channels ci (BLOCK_C,) float32: silu(conv1) of h1 rows 2r .. 2r + 2 (h1 row 0
    the conv1 cache row, row i the normalized feature frame i - 1), rounded to dtype where PyTorch rounds; zero
    outside 0 <= c < M1 (conv2's mel padding)."""
    t = tl.arange(0, 16)  # tap 3 kt + kf
    rows, cols = 2 * r + t // 3, 2 * c - 1 + t % 3
    ok = (t < 9) & (cols >= 0) & (cols < M)
    h = _h1(feats_row, c1_row, mean_ptr, istd_ptr, rows, cols, ok, M, dtype)
    w = tl.load(w1_ptr + ci[:, None] * 9 + t[None, :], mask=cmask[:, None] & (t < 9)[None, :], other=0.0)
    v = tl.sum(w.to(tl.float32) * h[None, :], axis=1) + tl.load(b1_ptr + ci, mask=cmask, other=0.0).to(tl.float32)
    return tl.where((c >= 0) & (c < M1), _silu(v, dtype).to(dtype).to(tl.float32), 0.0)


@triton.jit
def _front_item(feats_row, c1_row, c2_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, lin_ptr, m, cb, ci,
                cmask, jj, jmask, M, M1, C: tl.constexpr, J: tl.constexpr, CB: tl.constexpr, BLOCK_C: tl.constexpr,
                dtype: tl.constexpr):  # fmt: skip
    """Conv2 + silu at mel position m for output channels cb CB ..., then their share of the Linear: its partial sums
    (even and odd halves, (BLOCK_J,) float32). w2_ptr: `FrontEndWeights.conv2_taps`; lin_ptr: `out_by_mel` as
    column pairs."""
    co = cb * CB + tl.arange(0, CB)
    omask = co < C
    wmask = omask[:, None] & cmask[None, :]
    acc = tl.zeros((CB, BLOCK_C), tl.float32)
    for kf in tl.static_range(3):
        c = 2 * m - 1 + kf
        h0 = tl.load(c2_row + ci * M1 + c, mask=cmask & (c >= 0) & (c < M1), other=0.0).to(tl.float32)
        h1 = _conv1_at(feats_row, c1_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, ci, cmask, 0, c, M, M1, dtype)
        h2 = _conv1_at(feats_row, c1_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, ci, cmask, 1, c, M, M1, dtype)
        tap = w2_ptr + co[:, None] * C + ci[None, :]
        acc += tl.load(tap + kf * C * C, mask=wmask, other=0.0).to(tl.float32) * h0[None, :]
        acc += tl.load(tap + (3 + kf) * C * C, mask=wmask, other=0.0).to(tl.float32) * h1[None, :]
        acc += tl.load(tap + (6 + kf) * C * C, mask=wmask, other=0.0).to(tl.float32) * h2[None, :]
    v = tl.sum(acc, axis=1) + tl.load(b2_ptr + co, mask=omask, other=0.0).to(tl.float32)
    bv = _silu(v, dtype).to(dtype).to(tl.float32)[:, None]
    lo, hi = _halves(_wrows(lin_ptr + m * C * J, co, omask, jj, jmask, J))
    return tl.sum(lo * bv, axis=0), tl.sum(hi * bv, axis=0)


@triton.jit
def _front_x(acc_row, CS, lb_ptr, SYNC_WAIT: tl.constexpr, bar_ptr, jj, jmask, dtype: tl.constexpr,
             NP: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    """The front end's output x (even and odd halves) from its accumulators and the Linear's bias, after its barrier
    if SYNC_WAIT, rounded to dtype."""
    if SYNC_WAIT:
        _wait(bar_ptr, NP)
    be, bo = _halves_of(lb_ptr, jj, jmask)
    xe = (_sum_copies(acc_row, 0, BLOCK_J, CS) + be).to(dtype).to(tl.float32)
    xo = (_sum_copies(acc_row, BLOCK_J, BLOCK_J, CS) + bo).to(dtype).to(tl.float32)
    return xe, xo


@triton.jit
def _write_front_caches(feats_row, c1_row, c2_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, q, ci, cmask, M, M1,
                        NP: tl.constexpr, BLOCK_M: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """The new front-end cache rows, once every program has read the old ones (after the front end's barrier): conv1's
    the last normalized feature frame (program 0), conv2's the last conv1 output row (mel column c by program
    c % NP)."""
    if q == 0:
        mm = tl.arange(0, BLOCK_M)
        last = tl.full((BLOCK_M,), 4, tl.int32)  # h1 row 4: feature frame 3
        h = _h1(feats_row, c1_row, mean_ptr, istd_ptr, last, mm, mm < M, M, dtype)
        tl.store(c1_row + mm, h.to(c1_row.dtype.element_ty), mask=mm < M)
    for c in range(q, M1, NP):
        a = _conv1_at(feats_row, c1_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, ci, cmask, 1, c, M, M1, dtype)
        tl.store(c2_row + ci * M1 + c, a.to(c2_row.dtype.element_ty), mask=cmask)


@triton.jit
def _frame_kernel(feats_ptr, out_ptr, slots_ptr, c1_ptr, c2_ptr, conv_ptr, ssm_ptr, mean_ptr, istd_ptr, w1_ptr, b1_ptr,
                  w2_ptr, b2_ptr, lin_ptr, lb_ptr, norm_ptr, in_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr, dskip_ptr,
                  gnorm_ptr, outw_ptr, normf_ptr, hw_ptr, hb_ptr, acc_ptr, bar_ptr, S, LS, CS, first, last, eps, M,
                  M1,
                  NL: tl.constexpr, D: tl.constexpr, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                  G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, M2: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, CB: tl.constexpr,
                  SYNC: tl.constexpr, LOG_PROBS: tl.constexpr):  # fmt: skip
    """Phases first .. last of stream b = program_id(1) (module docstring): phase -1 is the front end; phase l loads
    layer l's tiles, then finishes the front end (l = 0, after its barrier if SYNC) or layer l - 1 and runs layer l;
    phase NL ends with the head. lin_ptr, in_ptr, hw_ptr and outw_ptr (out_proj transposed) point at those weights
    as column pairs; acc_ptr at rows of 2 BLOCK_J + 2 float32 (B, NL + 1) a copy (the front end's last), LS words
    from a layer's to the next, CS from a copy to the next (`_acc_strides`), bar_ptr at
    (B, NL + 2) int32 (the barriers' counters, the front end's last, then the exit count). Under SYNC the launch
    leaves both zeroed: each exchange is cleared once every program has passed the next barrier, the last layer's
    by the last program to leave."""
    q, b = tl.program_id(0), tl.program_id(1)
    n_rb: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    NP: tl.constexpr = H * n_rb
    DI: tl.constexpr = H * P
    CD: tl.constexpr = DI + 2 * G * N
    J: tl.constexpr = D // 2
    AWC: tl.constexpr = 2 * BLOCK_J + 2  # an accumulator row
    NCB: tl.constexpr = (C + CB - 1) // CB  # conv2 channel blocks
    h = q // n_rb
    grp = h // (H // G)
    is_writer = q % (n_rb * (H // G)) == 0  # the group's first program: it shifts the B and C cache rows
    dtype = norm_ptr.dtype.element_ty  # the model's (out_ptr's is float32 for LOG_PROBS)
    jj = tl.arange(0, BLOCK_J)
    jmask = jj < J
    rp = (q % n_rb) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = rp < P
    nn = tl.arange(0, BLOCK_N)
    nmask = nn < N
    ci = tl.arange(0, BLOCK_C)
    cmask = ci < C
    xch, bch, cch = h * P + rp, DI + grp * N + nn, DI + (G + grp) * N + nn  # conv channels
    slot = tl.load(slots_ptr + b)
    accs, bars = acc_ptr + b * (NL + 1) * LS, bar_ptr + b * (NL + 2)  # the stream's
    feats_row, c1_row, c2_row = feats_ptr + b * 4 * M, c1_ptr + slot * M, c2_ptr + slot * C * M1
    if first < 0:  # the front end: conv2 at mel position m for channel block cb, and its share of the Linear
        pe = tl.zeros((BLOCK_J,), tl.float32)
        po = tl.zeros((BLOCK_J,), tl.float32)
        for item in range(q, M2 * NCB, NP):
            e, o = _front_item(feats_row, c1_row, c2_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                               lin_ptr, item // NCB, item % NCB, ci, cmask, jj, jmask, M, M1, C, J, CB, BLOCK_C,
                               dtype)  # fmt: skip
            pe += e
            po += o
        if q < M2 * NCB:
            fe_row = accs + NL * LS + (q % _COPIES) * CS
            tl.atomic_add(fe_row + jj, pe, sem="relaxed")
            tl.atomic_add(fe_row + BLOCK_J + jj, po, sem="relaxed")
        if SYNC:
            _arrive(bars + NL)
    xe = tl.zeros((BLOCK_J,), tl.float32)
    xo = tl.zeros((BLOCK_J,), tl.float32)
    if first > 0:  # launched phase by phase: x, then the residual adds before phase first - 1's
        xe, xo = _front_x(accs + NL * LS, CS, lb_ptr, False, bars + NL, jj, jmask, dtype, NP, BLOCK_J)
        for layer in range(0, first - 1):
            xe, xo = _add_mixer(xe, xo, accs + layer * LS, CS, False, bars, eps, dtype, NP, DI, BLOCK_J)
    bc_rows = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # layer l - 1's new B and C cache rows (the writer's)
    cc_rows = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for phase in range(tl.maximum(first, 0), last + 1):
        layer = tl.minimum(phase, NL - 1)  # the last phase loads (and leaves) the last layer's tiles
        w_in = in_ptr + layer * (DI + CD + H) * J
        # z and x rows as one interleaved tile (z_0, x_0, z_1, ...) in the B and C tile's layout: one reduction and two
        # layout conversions fewer a layer. H100, bf16, GPU us a call at 1 / 2 / 4 streams: 62.9 / 75.0 / 94.1 against
        # 65.4 / 76.2 / 96.0 as two tiles (BENCHMARKS.md, session 20)
        zx = tl.arange(0, 2 * BLOCK_P)
        zx_rows = (zx % 2) * DI + h * P + (q % n_rb) * BLOCK_P + zx // 2
        w_zx = _wrows(w_in, zx_rows, (q % n_rb) * BLOCK_P + zx // 2 < P, jj, jmask, J)
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
            xe, xo = _add_mixer(xe, xo, accs + (phase - 1) * LS, CS, SYNC, bars + phase - 1, eps, dtype, NP, DI,
                                BLOCK_J)  # fmt: skip
            if SYNC and q == NP - 1:  # every program is past the barrier of phase - 1, so done with the one before
                _zero_exchange(accs, bars, NL if phase == 1 else phase - 2, LS, CS, AWC)
        else:
            xe, xo = _front_x(accs + NL * LS, CS, lb_ptr, SYNC, bars + NL, jj, jmask, dtype, NP, BLOCK_J)
        if phase < NL:
            he, ho = _rms(xe, xo, nw_e, nw_o, eps, dtype, D)
            z, vx = tl.split(tl.reshape(_matvec(w_zx, he, ho, dtype), (BLOCK_P, 2)))
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
            acc_row = accs + layer * LS + (q % _COPIES) * CS
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
                _write_front_caches(feats_row, c1_row, c2_row, mean_ptr, istd_ptr, w1_ptr, b1_ptr, q, ci, cmask, M,
                                    M1, NP, BLOCK_M, dtype)  # fmt: skip
        else:
            _write_bc(conv_ptr, phase - 1, S, slot, is_writer, bch, cch, nmask, bc_prev, cc_prev, CD, K, BLOCK_K)
            if SYNC:
                if _last_to_leave(bars + NL + 1, NP):
                    _zero_exchange(accs, bars, NL - 1, LS, CS, AWC)
                    tl.store(bars + NL + 1, 0)
            if q == 0:
                _head(out_ptr + b * V, xe, xo, normf_ptr, hw_ptr, hb_ptr, jj, jmask, eps, dtype, D, J, V, BLOCK_V,
                      LOG_PROBS)  # fmt: skip


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


def conv2_block(channels: int, m2: int, n_programs: int) -> int:
    """The front end's conv2 output channels an item (CB): the fewest, a power of two at least 4, for which its
    m2 x channels / CB items fit `n_programs` programs."""
    fit = triton.next_power_of_2(triton.cdiv(channels * m2, n_programs))
    return min(max(4, fit), max(4, triton.next_power_of_2(channels)))


def takes(feats: torch.Tensor, w: EncoderWeights) -> bool:
    """Whether `frame_step` takes feats (B, 4 L, n_mels): one encoder frame (L = 1), the model in float32 or bfloat16
    with d_model even, and a grid for B streams that fits on the device."""
    return (
        feats.dim() == 3
        and feats.shape[1] == SUBSAMPLING
        and w.norm.shape[1] % 2 == 0
        and w.norm.dtype in _DTYPES
        and block_p_for(w, feats.shape[0], feats.device) is not None
    )


def _acc_words(streams: int, w: EncoderWeights) -> int:
    """The accumulators' float32 words of a launch of `streams` streams: _COPIES x B x (NL + 1) rows."""
    return _COPIES * streams * (w.norm.shape[0] + 1) * _acc_row(w)


def _acc_row(w: EncoderWeights) -> int:
    """The words of an accumulator row: out_proj's D outputs as even then odd halves (2 BLOCK_J), the sum of
    squares and a spare."""
    return 2 * triton.next_power_of_2(w.norm.shape[1] // 2) + 2


def _acc_strides(streams: int, w: EncoderWeights) -> tuple[int, int]:
    """(layer, copy) strides of the accumulator rows, in words: each copy of all streams' rows apart from the next,
    (_COPIES, B, NL + 1, row). A layer's copies side by side measured the same within run-to-run spread
    (BENCHMARKS.md, session 17)."""
    return _acc_row(w), streams * (w.norm.shape[0] + 1) * _acc_row(w)


def work_words(streams: int, w: EncoderWeights) -> int:
    """The int32 words of `frame_step`'s `work` for `streams` streams: the accumulators, then (B, NL + 2) counters."""
    return _acc_words(streams, w) + streams * (w.norm.shape[0] + 2)


def _check_work(work: torch.Tensor | None, need: int, device: torch.device) -> None:
    """Raise ValueError unless `work` is None or a contiguous int32 tensor on `device` of at least `need` words."""
    if work is None:
        return
    if work.dtype != torch.int32 or work.device != device or not work.is_contiguous() or work.numel() < need:
        raise ValueError(f"work must be a contiguous int32 tensor of at least {need} words on {device}, got "
                         f"{work.dtype} {tuple(work.shape)} on {work.device}")  # fmt: skip


def _packed(t: torch.Tensor) -> torch.Tensor:
    """A contiguous matrix (..., C) viewed as column pairs: two bf16 in an int32, two float32 in an int64."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.bfloat16 else torch.int64)


def _check_args(feats, w, conv1, conv2, conv, ssm, slots) -> None:
    """Raise ValueError unless the arguments fit together (the front end's and the encoder's checks)."""
    f = w.front
    names = ("conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "out_weight", "out_bias")
    front = {name: getattr(f, name) for name in names}
    _check_shapes(feats, conv1, conv2, slots, f.cmvn_mean, f.cmvn_istd, front)
    _check_types(feats, conv1, conv2, slots, f.cmvn_mean, f.cmvn_istd, front)
    if feats.shape[1] != SUBSAMPLING or w.norm.shape[1] % 2 or w.norm.dtype not in _DTYPES:
        raise ValueError(
            f"frame_step takes one encoder frame a stream, feats (B, {SUBSAMPLING}, n_mels), of a float32 or bfloat16 "
            f"model with d_model even; got feats {tuple(feats.shape)}, a {w.norm.dtype} model of d_model "
            f"{w.norm.shape[1]}"
        )
    if f.out_bias.shape[0] != w.norm.shape[1] or feats.device != f.out_bias.device:
        raise ValueError("the front end's weights must give d_model and share the device")
    _check(f.out_bias.expand(feats.shape[0], 1, -1), w, conv, ssm, slots)  # the front end's output (B, 1, D)
    if conv1.shape[0] != conv.shape[1] or not (conv1.is_contiguous() and conv2.is_contiguous()):
        raise ValueError(f"the front-end pools must be contiguous with the layers' {conv.shape[1]} slots, got "
                         f"{tuple(conv1.shape)} and {tuple(conv2.shape)}")  # fmt: skip


def frame_step(
    feats: torch.Tensor,
    w: EncoderWeights,
    conv1: torch.Tensor,
    conv2: torch.Tensor,
    conv: torch.Tensor,
    ssm: torch.Tensor,
    slots: torch.Tensor,
    check: bool = True,
    persistent: bool | None = None,
    block_p: int | None = None,
    num_warps: int = _WARPS,
    log_probs: bool = False,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton form of `frame_step_ref`: logits (B, 1, V) in the model dtype, or with `log_probs` their
    log-softmax in float32; the pool rows `slots` advanced in place. `check=False` skips `check_slots` (no device
    sync; the caller vouches, as under CUDA graph capture). `persistent` (default: except in the interpreter) runs
    one launch with grid barriers, else a launch a phase. `block_p` (default `block_p_for`): state rows a program,
    a power of two. `work`: the launch's accumulators and barrier counters, int32 (`work_words(B, w)`,) zeroed,
    which the call leaves zeroed, so that a caller reusing it (a CUDA graph) needs no memset a call; default: a
    fresh one a call."""
    _check_args(feats, w, conv1, conv2, conv, ssm, slots)
    n_work = work_words(feats.shape[0], w)
    _check_work(work, n_work, feats.device)
    if check:
        check_slots(slots, conv.shape[1])
    persistent = not _interpreting() if persistent is None else persistent
    b, _, m = feats.shape
    nl, s, h, p, n = ssm.shape
    d, c = w.norm.shape[1], w.front.conv1_weight.shape[0]
    block_p = block_p if block_p is not None else block_p_for(w, b, feats.device)
    if block_p is None or block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two (or {b} streams fit no grid on this device), got {block_p}")
    n_programs = h * triton.cdiv(p, block_p)
    if persistent and feats.device.type == "cuda" and b * n_programs > _sm_count(feats.device):
        raise ValueError(f"{b} x {n_programs} programs do not fit on {_sm_count(feats.device)} SMs at once")
    k, v = w.conv_weight.shape[2], w.head_weight.shape[0]
    block_j = triton.next_power_of_2(d // 2)
    n_acc = _acc_words(b, w)
    given = work is not None
    work = work if given else torch.zeros(n_work, device=feats.device, dtype=torch.int32)
    out = torch.empty(b, 1, v, device=feats.device, dtype=torch.float32 if log_probs else w.norm.dtype)
    m1, m2 = halved(m), halved(halved(m))
    cb = conv2_block(c, m2, n_programs)
    consts = dict(
        NL=nl, D=d, H=h, P=p, N=n, G=w.n_groups, K=k, V=v, C=c, M2=m2, BLOCK_J=block_j, BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(n), BLOCK_K=triton.next_power_of_2(k - 1),
        BLOCK_V=triton.next_power_of_2(v), BLOCK_C=triton.next_power_of_2(c), BLOCK_M=triton.next_power_of_2(m),
        CB=cb, num_warps=num_warps,
    )  # fmt: skip
    f = w.front
    front = (f.cmvn_mean, f.cmvn_istd, f.conv1_weight, f.conv1_bias, f.conv2_taps, f.conv2_bias,
             _packed(f.out_by_mel), f.out_bias)  # fmt: skip
    tensors = [t.contiguous() for t in w.tensors()]
    tensors[1], tensors[8], tensors[10] = _packed(w.in_proj), _packed(w.out_proj_t), _packed(w.head_weight)
    accs, counters = work[:n_acc].view(torch.float32), work[n_acc:n_work]
    args = (feats.contiguous(), out, slots.contiguous(), conv1, conv2, conv, ssm, *(t.contiguous() for t in front),
            *tensors, accs, counters, s, *_acc_strides(b, w))  # fmt: skip
    phases = [(-1, nl)] if persistent else [(i, i) for i in range(-1, nl + 1)]
    for first, last in phases:
        _frame_kernel[(n_programs, b)](*args, first, last, w.eps, m, m1, SYNC=persistent, LOG_PROBS=log_probs,
                                       **consts)  # fmt: skip
    if given and not persistent:  # the one launch clears what it used; the phased launches leave it to this
        work.zero_()
    return out
