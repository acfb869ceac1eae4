"""The streaming step of every Mamba layer, the final norm and the CTC head, for a few streams, in ONE launch.

Same function as `encoder_step_ref` below: for B streams of L frames with B L <= MAX_ROWS (a live caption stream
stepping a frame or a few at a time), from the front end's output x (B, L, D) to the logits (B, L, V), advancing
the pool rows `slots` of every layer in place. The per-layer path (`kernels/step.py`, `kernels/norm.py` and two
cuBLAS GEMMs) takes six launches a layer; at batch 1 each of them is a microsecond or two however little it does
(BENCHMARKS.md, "where the batch-1 step's time goes"). Here a grid of NP = H ceil(P / BLOCK_P) programs, all
resident at once, runs the whole encoder and meets at one grid-wide barrier a layer.

The grid holds NP programs for each stream group (stream b in group b % groups, one group a stream while the SMs
hold them). Program (h, i) of a group owns state rows i BLOCK_P ... of head h of the group's streams; it reads
its weight tiles of layer l and the state slice of its group's first stream before waiting at the barrier of layer
l - 1 (the reads overlap the wait), then:
  1. h_l = rms_norm(x) norm_l over the whole residual x (every program keeps its own copy of x, float32 holding
     model-dtype values), and its slice of in_proj: z and x for its channels, B and C of its group, dt of its head,
     as tl.dots over the B L rows (padded to MAX_ROWS); z stays in registers, the rest goes into a scratch of its
     own (global, cache-resident), from which the conv reads rows;
  2. for each of its streams: the causal depthwise conv + SiLU of those channels (taps from the conv cache row and
     the scratch's rows), the selective state update and y = S C + D x for the L frames with its state slice in
     registers (loaded and stored once), y kept in registers (nothing is stored in the frame loop, so the compiler
     may issue every frame's loads up front), then the shift of its x channels' conv cache; then g = y silu(z);
  3. its share of the gated RMSNorm and out_proj. The norm's scale rsqrt(mean(g^2) + eps) is one number per row,
     so out_proj(rms_norm(g) w) = rsqrt(...) W_out (g w): every program adds sum(g^2) of its channels and
     W_out[:, its channels] (g w) into float32 accumulators (atomics) of layer l;
  4. its arrival at the grid barrier of layer l; the next layer's loads; the wait for the others; then
     x += out_proj from the accumulators (the same sum for every program).
B and C are shared by the heads of a group, so every program of the group computes them and reads their conv
cache; the group's first program writes that cache, after the barrier (when no one reads it any more), from its
pre-conv B and C rows still in its scratch. After the last layer program 0 applies norm_f and the head.

The barrier is a counter per layer (zeroed with the accumulators by one memset a call): each program adds one
(release) as soon as its atomics are issued, and spins until all NP have (acquire) after issuing the next layer's
loads. It needs every program resident: `encoder_step` refuses a grid larger than the SM count. Triton's
interpreter runs programs one after another, so a spinning barrier would never return there: the interpreter (and
`persistent=False`) launches one phase at a time, each launch starting from x and replaying the residual adds of
the layers before (the accumulators persist within a call).

Rounding follows the per-layer path: in_proj's outputs, out_proj's and each residual sum are rounded to the model
dtype; the SSM state and every sum are float32 (tl.dot with "ieee" precision for float32 weights: never tf32).
The gated norm's input to out_proj is rounded before its scale is applied (the per-layer path rounds after), and
in_proj's dt column is a float32 dot product, not a GEMM: bf16 results agree to bf16 tolerance, float32 closely.

Shapes: B streams, L frames, R = B L rows (row b L + t), S pool slots, NL layers, D d_model, H heads, P head_dim,
G groups (head j reads group j // (H / G)), N d_state, K conv width, V vocabulary, DI = H P,
CD = DI + 2 G N, DIP = DI + CD + H. Pools: conv (NL, S, CD, K - 1) in the model dtype and ssm (NL, S, H, P, N)
float32, as `ASRModel.init_state` allocates them (each layer's state a view of one tensor). slots (B,) int64,
distinct, except that pad rows may all share one spare slot whose contents nobody reads (the CUDA-graph stepper's
padding: they race only on that slot). No autotuning: the launch writes the pools in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.frontend import FrontEndWeights
from kernels.norm import add_rms_norm_ref
from kernels.step import _interpreting, _sm_count, check_slots, step_ref

__all__ = ["EncoderWeights", "encoder_step", "encoder_step_ref", "max_streams", "stacked_pool", "MAX_ROWS"]

MAX_ROWS = 16  # B L rows a call takes: the M of every tl.dot tile
_BLOCK_P = 16  # state rows of a head per program (the out_proj tl.dot's K: at least 16)
_WARPS = 4


@dataclass(frozen=True)
class EncoderWeights:
    """The encoder's weights stacked over its NL layers, all in the model dtype, and the front end's
    (`ASRModel.encoder_weights`)."""

    norm: torch.Tensor  # (NL, D) each block's RMSNorm
    in_proj: torch.Tensor  # (NL, DIP, D)
    conv_weight: torch.Tensor  # (NL, CD, K)
    conv_bias: torch.Tensor  # (NL, CD)
    dt_bias: torch.Tensor  # (NL, H)
    A_log: torch.Tensor  # (NL, H)
    D: torch.Tensor  # (NL, H)
    gated_norm: torch.Tensor  # (NL, DI) the mixer's gated RMSNorm
    out_proj: torch.Tensor  # (NL, D, DI)
    norm_f: torch.Tensor  # (D,)
    head_weight: torch.Tensor  # (V, D)
    head_bias: torch.Tensor  # (V,)
    n_groups: int
    head_dim: int
    eps: float  # of every RMSNorm
    front: FrontEndWeights  # the front end's (`kernels/frame_step.py` runs it; this module starts after it)
    out_proj_t: torch.Tensor = field(init=False)  # (NL, DI, D) out_proj transposed: `kernels/frame_step.py` reads rows

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_proj_t", self.out_proj.transpose(1, 2).contiguous())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.norm, self.in_proj, self.conv_weight, self.conv_bias, self.dt_bias, self.A_log, self.D,
                self.gated_norm, self.out_proj, self.norm_f, self.head_weight, self.head_bias)  # fmt: skip


def encoder_step_ref(
    x: torch.Tensor, w: EncoderWeights, conv: torch.Tensor, ssm: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """x (B, L, D) -> logits (B, L, V) by the per-layer reference math (`step_ref`, `add_rms_norm_ref`), advancing
    pool rows `slots` of conv (NL, S, CD, K - 1) and ssm (NL, S, H, P, N) in place."""
    _, h = add_rms_norm_ref(x, None, w.norm[0], w.eps)
    norms = [*w.norm[1:], w.norm_f]
    for layer, norm in enumerate(norms):
        y = step_ref(
            F.linear(h, w.in_proj[layer]), conv[layer], ssm[layer], slots, w.conv_weight[layer], w.conv_bias[layer],
            w.dt_bias[layer], w.A_log[layer], w.D[layer], w.gated_norm[layer], w.n_groups, w.head_dim, w.eps,
        )  # fmt: skip
        x, h = add_rms_norm_ref(x, F.linear(y, w.out_proj[layer]), norm, w.eps)
    return F.linear(h, w.head_weight, w.head_bias)


@triton.jit
def _rms_rows(x, w_ptr, dd, dmask, eps, D: tl.constexpr):
    """rms_norm of the rows of x (BLOCK_R, BLOCK_D) float32, times the weight at w_ptr, float32."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + dd, mask=dmask, other=0.0).to(tl.float32)
    return x * rstd[:, None] * w[None, :]


@triton.jit
def _rows_T(w_ptr, out_rows, omask, dd, dmask, D: tl.constexpr):
    """W[out_rows]^T (BLOCK_D, len(out_rows)) for W (., D) at w_ptr."""
    return tl.load(w_ptr + out_rows[None, :] * D + dd[:, None], mask=omask[None, :] & dmask[:, None], other=0.0)


@triton.jit
def _proj(hn, w_t, PREC: tl.constexpr):
    """hn (BLOCK_R, BLOCK_D) @ w_t (BLOCK_D, C) -> float32 holding values rounded to hn's dtype (a GEMM's output)."""
    return tl.dot(hn, w_t, input_precision=PREC).to(hn.dtype).to(tl.float32)


@triton.jit
def _tap(scr, part, loc, cmask, cache_row, ch, r0, j: tl.constexpr, K: tl.constexpr, SW: tl.constexpr):
    """Input j of a stream's conv window for channels ch: cache column j for j < K - 1, else the pre-conv row
    r0 + j - (K - 1) (the stream's frames start at row r0) of the scratch's column block `part` (local columns
    loc). (C,) float32."""
    if j < K - 1:
        v = tl.load(cache_row + ch * (K - 1) + j, mask=cmask, other=0.0).to(tl.float32)
    else:
        v = tl.load(scr + (r0 + j - (K - 1)) * SW + part + loc, mask=cmask, other=0.0)
    return v


@triton.jit
def _conv_silu(scr, part, loc, cmask, cache_row, w_ptr, b_ptr, ch, r0, t: tl.constexpr, K: tl.constexpr,
               SW: tl.constexpr):  # fmt: skip
    """SiLU of the causal depthwise conv of channels ch at the stream's frame t. (C,) float32."""
    acc = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + ch * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += w * _tap(scr, part, loc, cmask, cache_row, ch, r0, t + k, K, SW)
    return acc * tl.sigmoid(acc)


@triton.jit
def _shift_cache(scr, part, loc, cmask, cache_row, ch, r0, L: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                 SW: tl.constexpr):  # fmt: skip
    """Rewrite channels ch of a conv cache row to the last K - 1 inputs of cat(old row, the stream's L pre-conv rows
    in the scratch). Every read of the old row comes before a CTA barrier, every write after."""
    kk = tl.arange(0, BLOCK_K)
    src = L + kk  # column of cat(old row, frames) that becomes column kk
    keep = cmask[:, None] & (kk[None, :] < K - 1)
    cached = src[None, :] < K - 1
    old = tl.load(cache_row + ch[:, None] * (K - 1) + src[None, :], mask=keep & cached, other=0.0)
    new = tl.load(scr + (r0 + src[None, :] - (K - 1)) * SW + part + loc[:, None], mask=keep & ~cached, other=0.0)
    value = tl.where(cached, old.to(tl.float32), new)
    tl.debug_barrier()
    tl.store(cache_row + ch[:, None] * (K - 1) + kk[None, :], value.to(cache_row.dtype.element_ty), mask=keep)


@triton.jit
def _softplus(v):
    """torch's softplus (threshold 20)."""
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def _add_mixer(x, acc_ptr, sumsq_ptr, layer, R, rows, rmask, dd, rd_mask, eps, dtype: tl.constexpr,
               D: tl.constexpr, DI: tl.constexpr):  # fmt: skip
    """x + out_proj of layer `layer` from its accumulators: out rounded to the model dtype, then the sum, as
    PyTorch's out_proj and add are."""
    acc = tl.load(acc_ptr + (layer * R + rows[:, None]) * D + dd[None, :], mask=rd_mask, other=0.0,
                  cache_modifier=".cg")  # fmt: skip
    ss = tl.load(sumsq_ptr + layer * R + rows, mask=rmask, other=0.0, cache_modifier=".cg")
    out = (acc * tl.rsqrt(ss / DI + eps)[:, None]).to(dtype).to(tl.float32)
    return (x + out).to(dtype).to(tl.float32)


@triton.jit
def _arrive(counter_ptr):
    """The program's arrival at a grid barrier: its global writes so far become visible to any program that then
    returns from `_wait` on the same counter."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(counter_ptr, n_programs):
    """Wait until all n_programs programs have arrived at the barrier of counter_ptr."""
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < n_programs:
        pass
    tl.debug_barrier()


@triton.jit
def _mixer(x, layer, h, grp, rp, pmask, nn, nmask, sg, n_sg, w_z, w_x, w_b, w_c, w_dt, w_out, state0, s_off,
           s_mask, scr, slot0, slots_ptr, conv_ptr, ssm_ptr, norm_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr,
           dskip_ptr, gnorm_ptr, acc_ptr, sumsq_ptr, B, S, R, rows, mine, dd, dmask, eps, D: tl.constexpr,
           H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, G: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SW: tl.constexpr,
           PREC: tl.constexpr):  # fmt: skip
    """Steps 1-3 of layer `layer` for the program of head h (group grp), state rows rp, in stream group sg (module
    docstring), given its in_proj and out_proj weight tiles and the state slice state0 of its first stream (sg, in
    pool row slot0; s_off and s_mask address the slice in a row), loaded before the grid barrier: its slice of the
    mixer, added into the layer's accumulators."""
    DI = H * P
    CD = DI + 2 * G * N
    pp = tl.arange(0, BLOCK_P)  # the scratch's local columns of rp
    xch, bch, cch = h * P + rp, DI + grp * N + nn, DI + (G + grp) * N + nn  # conv channels
    hn = _rms_rows(x, norm_ptr + layer * D, dd, dmask, eps, D).to(w_z.dtype)
    dt_raw = tl.sum(hn.to(tl.float32) * w_dt[None, :], axis=1).to(w_z.dtype).to(tl.float32)  # (BLOCK_R,)
    z = _proj(hn, w_z, PREC)  # (BLOCK_R, BLOCK_P), kept for the gate
    srow = scr + rows[:, None] * SW  # the program's scratch: x | B | C | dt, by row (pre-conv)
    tl.store(srow + pp[None, :], _proj(hn, w_x, PREC))
    tl.store(srow + BLOCK_P + nn[None, :], _proj(hn, w_b, PREC))
    tl.store(srow + BLOCK_P + BLOCK_N + nn[None, :], _proj(hn, w_c, PREC))
    tl.store(scr + rows * SW + BLOCK_P + 2 * BLOCK_N, dt_raw)
    tl.debug_barrier()
    A = -tl.exp(tl.load(alog_ptr + layer * H + h).to(tl.float32))
    d_skip = tl.load(dskip_ptr + layer * H + h).to(tl.float32)
    dt_bias = tl.load(dtb_ptr + layer * H + h).to(tl.float32)
    cw, cb = cw_ptr + layer * CD * K, cb_ptr + layer * CD
    slot, state = slot0, state0
    y = tl.zeros_like(z)  # row r: the y of row r's frame, kept in registers (no store in the frame loop)
    for b in range(sg, B, n_sg):
        if b != sg:  # a later stream of the group: its state was not loaded before the barrier
            slot = tl.load(slots_ptr + b)
            state = tl.load(ssm_ptr + (layer * S + slot) * H * P * N + s_off, mask=s_mask, other=0.0)
        s_ptr = ssm_ptr + (layer * S + slot) * H * P * N + s_off
        cache = conv_ptr + (layer * S + slot) * CD * (K - 1)
        r0 = b * L
        for t in tl.static_range(L):
            xt = _conv_silu(scr, 0, pp, pmask, cache, cw, cb, xch, r0, t, K, SW)
            bt = _conv_silu(scr, BLOCK_P, nn, nmask, cache, cw, cb, bch, r0, t, K, SW)
            ct = _conv_silu(scr, BLOCK_P + BLOCK_N, nn, nmask, cache, cw, cb, cch, r0, t, K, SW)
            dt = _softplus(tl.load(scr + (r0 + t) * SW + BLOCK_P + 2 * BLOCK_N) + dt_bias)
            state = state * tl.exp(dt * A) + (dt * xt)[:, None] * bt[None, :]
            yt = tl.sum(state * ct[None, :], axis=1) + d_skip * xt
            y = tl.where(rows[:, None] == r0 + t, yt[None, :], y)
        tl.store(s_ptr, state, mask=s_mask)
        _shift_cache(scr, 0, pp, pmask, cache, xch, r0, L, K, BLOCK_K, SW)
    gated = y * z * tl.sigmoid(z)  # zero outside the group's rows, where y is
    tl.atomic_add(sumsq_ptr + layer * R + rows, tl.sum(gated * gated, axis=1), mask=mine, sem="relaxed")
    gw = tl.load(gnorm_ptr + layer * DI + xch, mask=pmask, other=0.0).to(tl.float32)
    part = tl.dot((gated * gw[None, :]).to(w_out.dtype), w_out, input_precision=PREC)  # (BLOCK_R, BLOCK_D)
    tl.atomic_add(acc_ptr + (layer * R + rows[:, None]) * D + dd[None, :], part, mask=mine[:, None] & dmask[None, :],
                  sem="relaxed")  # fmt: skip


@triton.jit
def _write_bc_cache(layer, grp, sg, n_sg, scr, slots_ptr, conv_ptr, B, S, N: tl.constexpr, G: tl.constexpr,
                    DI: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SW: tl.constexpr):  # fmt: skip
    """Shift group grp's B and C conv cache channels of layer `layer`, for the streams of group sg, by the pre-conv
    rows that the program left in its scratch; then a CTA barrier (the next layer overwrites the scratch)."""
    nn = tl.arange(0, BLOCK_N)
    nmask = nn < N
    CD = DI + 2 * G * N
    for b in range(sg, B, n_sg):
        cache = conv_ptr + (layer * S + tl.load(slots_ptr + b)) * CD * (K - 1)
        _shift_cache(scr, BLOCK_P, nn, nmask, cache, DI + grp * N + nn, b * L, L, K, BLOCK_K, SW)
        _shift_cache(scr, BLOCK_P + BLOCK_N, nn, nmask, cache, DI + (G + grp) * N + nn, b * L, L, K, BLOCK_K, SW)
    tl.debug_barrier()


@triton.jit
def _head(x, out_ptr, normf_ptr, hw_ptr, hb_ptr, rows, rmask, dd, dmask, eps, D: tl.constexpr, V: tl.constexpr,
          BLOCK_V: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """logits = head(rms_norm(x) norm_f) into out_ptr (R, V), in the model dtype."""
    dtype = hw_ptr.dtype.element_ty
    hn = _rms_rows(x, normf_ptr, dd, dmask, eps, D).to(dtype)
    vv = tl.arange(0, BLOCK_V)
    vmask = vv < V
    logits = tl.dot(hn, _rows_T(hw_ptr, vv, vmask, dd, dmask, D), input_precision=PREC)
    logits += tl.load(hb_ptr + vv, mask=vmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * V + vv[None, :], logits.to(dtype), mask=rmask[:, None] & vmask[None, :])


@triton.jit
def _encoder_step_kernel(x_ptr, out_ptr, slots_ptr, conv_ptr, ssm_ptr, norm_ptr, in_ptr, cw_ptr, cb_ptr, dtb_ptr,
                         alog_ptr, dskip_ptr, gnorm_ptr, outw_ptr, normf_ptr, hw_ptr, hb_ptr, acc_ptr, sumsq_ptr,
                         scratch_ptr, bar_ptr, B, S, first, last, eps, NL: tl.constexpr, D: tl.constexpr,
                         H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
                         L: tl.constexpr, V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_V: tl.constexpr, PREC: tl.constexpr, SYNC: tl.constexpr):  # fmt: skip
    """Phases first .. last (module docstring): phase l loads layer l's weight tiles, then finishes layer l - 1
    (after the grid barrier if SYNC; the residual add, and the B and C conv cache by each group's first program)
    and runs layer l; phase NL ends with the head (program 0). The grid is NP programs per stream group."""
    pid = tl.program_id(0)
    n_rb = (P + BLOCK_P - 1) // BLOCK_P
    n_programs = H * n_rb  # a stream group's
    sg, q = pid // n_programs, pid % n_programs
    n_sg = tl.num_programs(0) // n_programs
    h = q // n_rb
    grp = h // (H // G)
    is_writer = q % (n_rb * (H // G)) == 0  # the first program of its group
    DI = H * P
    CD = DI + 2 * G * N
    SW = BLOCK_P + 2 * BLOCK_N + 1
    scr = scratch_ptr + pid * BLOCK_R * SW
    R = B * L
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < R
    mine = rmask & ((rows // L) % n_sg == sg)  # the rows of this group's streams
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    rd_mask = rmask[:, None] & dmask[None, :]
    dtype = x_ptr.dtype.element_ty
    rp = (q % n_rb) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = rp < P
    nn = tl.arange(0, BLOCK_N)
    nmask = nn < N
    x = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=rd_mask, other=0.0).to(tl.float32)
    slot0 = tl.load(slots_ptr + sg)  # the group's first stream: its state slice is loaded before each barrier
    s_off = h * P * N + rp[:, None] * N + nn[None, :]
    s_mask = pmask[:, None] & nmask[None, :]
    for layer in range(0, first - 1):  # launched phase by phase: the residual adds before phase first - 1's
        x = _add_mixer(x, acc_ptr, sumsq_ptr, layer, R, rows, rmask, dd, rd_mask, eps, dtype, D, DI)
    for phase in range(first, last + 1):
        layer = tl.minimum(phase, NL - 1)  # the last phase loads (and leaves) the last layer's tiles
        w_in = in_ptr + layer * (DI + CD + H) * D
        w_z = _rows_T(w_in, h * P + rp, pmask, dd, dmask, D)  # read while the other programs finish a layer
        w_x = _rows_T(w_in, DI + h * P + rp, pmask, dd, dmask, D)
        w_b = _rows_T(w_in, 2 * DI + grp * N + nn, nmask, dd, dmask, D)
        w_c = _rows_T(w_in, 2 * DI + (G + grp) * N + nn, nmask, dd, dmask, D)
        w_dt = tl.load(w_in + (DI + CD + h) * D + dd, mask=dmask, other=0.0).to(tl.float32)
        w_out = tl.load(
            outw_ptr + layer * D * DI + dd[None, :] * DI + (h * P + rp)[:, None],
            mask=pmask[:, None] & dmask[None, :],
            other=0.0,
        )  # (BLOCK_P, BLOCK_D): W_out[:, x ch]^T
        state0 = tl.load(ssm_ptr + (layer * S + slot0) * H * P * N + s_off, mask=s_mask & (phase < NL), other=0.0)
        if phase > 0:
            if SYNC:
                _wait(bar_ptr + phase - 1, tl.num_programs(0))
            x = _add_mixer(x, acc_ptr, sumsq_ptr, phase - 1, R, rows, rmask, dd, rd_mask, eps, dtype, D, DI)
            if is_writer:
                _write_bc_cache(phase - 1, grp, sg, n_sg, scr, slots_ptr, conv_ptr, B, S, N, G, DI, K, L, BLOCK_P,
                                BLOCK_N, BLOCK_K, SW)  # fmt: skip
        if phase < NL:
            _mixer(x, layer, h, grp, rp, pmask, nn, nmask, sg, n_sg, w_z, w_x, w_b, w_c, w_dt, w_out, state0, s_off,
                   s_mask, scr, slot0, slots_ptr, conv_ptr, ssm_ptr, norm_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr,
                   dskip_ptr, gnorm_ptr, acc_ptr, sumsq_ptr, B, S, R, rows, mine, dd, dmask, eps, D, H, P, N, G, K, L,
                   BLOCK_P, BLOCK_N, BLOCK_K, SW, PREC)  # fmt: skip
            if SYNC:
                _arrive(bar_ptr + phase)  # before the next layer's loads, which overlap the others' arrivals
        elif pid == 0:
            _head(x, out_ptr, normf_ptr, hw_ptr, hb_ptr, rows, rmask, dd, dmask, eps, D, V, BLOCK_V, PREC)


def stacked_pool(views: list[torch.Tensor]) -> torch.Tensor:
    """The one tensor (NL, ...) whose consecutive rows are `views` (each layer's state, as `ASRModel.init_state`
    allocates it); ValueError if they are not laid out so."""
    first = views[0]
    size = first.numel()
    for i, v in enumerate(views):
        if (
            not v.is_contiguous()
            or v.shape != first.shape
            or v.dtype != first.dtype
            or v.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or v.storage_offset() != first.storage_offset() + i * size
        ):
            raise ValueError(
                "the layers' states must be consecutive views of one tensor, as ASRModel.init_state allocates them"
            )
    return first.as_strided((len(views), *first.shape), (size, *first.stride()), first.storage_offset())


def max_streams(w: EncoderWeights, device: torch.device) -> int:
    """The most streams a launch takes with one group of programs per stream (`stream_groups`): beyond that a
    program steps several streams one after another, which measured slower than the per-layer step (BENCHMARKS.md,
    session 8). On CUDA: SMs // NP, at most MAX_ROWS; elsewhere (the interpreter) MAX_ROWS."""
    if device.type != "cuda":
        return MAX_ROWS
    return min(MAX_ROWS, _sm_count(device) // (w.dt_bias.shape[1] * triton.cdiv(w.head_dim, _BLOCK_P)))


def _check(x: torch.Tensor, w: EncoderWeights, conv: torch.Tensor, ssm: torch.Tensor, slots: torch.Tensor) -> None:
    """Raise ValueError unless the arguments fit together."""
    if x.dim() != 3 or not 1 <= x.shape[0] * x.shape[1] <= MAX_ROWS:
        raise ValueError(f"x must be (B, L, D) with 1 <= B L <= {MAX_ROWS}, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    nl, dip, d = w.in_proj.shape
    h = w.dt_bias.shape[1]
    di, cd, k = h * w.head_dim, w.conv_weight.shape[1], w.conv_weight.shape[2]
    n, rem = divmod(cd - di, 2 * w.n_groups)
    if h % w.n_groups or rem or n <= 0 or k < 2:
        raise ValueError(f"weights of {h} heads, {w.n_groups} groups, conv {tuple(w.conv_weight.shape)} do not fit")
    v = w.head_weight.shape[0]
    shapes = {"norm": (nl, d), "conv_bias": (nl, cd), "A_log": (nl, h), "D": (nl, h), "gated_norm": (nl, di),
              "out_proj": (nl, d, di), "norm_f": (d,), "head_weight": (v, d), "head_bias": (v,)}  # fmt: skip
    for name, shape in shapes.items():
        if tuple(getattr(w, name).shape) != shape:
            raise ValueError(f"weights.{name} must have shape {shape}, got {tuple(getattr(w, name).shape)}")
    if x.shape[2] != d or dip != di + cd + h:
        raise ValueError(f"x {tuple(x.shape)} does not fit the weights (in_proj {tuple(w.in_proj.shape)})")
    pool = conv.shape[1] if conv.dim() == 4 else -1
    if tuple(conv.shape) != (nl, pool, cd, k - 1) or tuple(ssm.shape) != (nl, pool, h, w.head_dim, n):
        raise ValueError(f"pools conv {tuple(conv.shape)} and ssm {tuple(ssm.shape)} do not fit the weights")
    if not (conv.is_contiguous() and ssm.is_contiguous()):
        raise ValueError("the pools must be contiguous: they are updated in place")
    if ssm.dtype != torch.float32 or conv.dtype != x.dtype:
        raise ValueError(f"ssm state must be float32 and conv cache {x.dtype}, got {ssm.dtype} and {conv.dtype}")
    if any(t.dtype != x.dtype for t in w.tensors()):
        raise ValueError(f"the weights must all have x's dtype {x.dtype}")
    if slots.dtype != torch.int64 or tuple(slots.shape) != (x.shape[0],):
        raise ValueError(f"slots must be int64 of shape ({x.shape[0]},), got {slots.dtype} {tuple(slots.shape)}")
    if len({t.device for t in (x, conv, ssm, slots, *w.tensors())}) != 1:
        raise ValueError("x, the pools, slots and the weights must be on one device")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"encoder_step needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def encoder_step(
    x: torch.Tensor,
    w: EncoderWeights,
    conv: torch.Tensor,
    ssm: torch.Tensor,
    slots: torch.Tensor,
    check: bool = True,
    persistent: bool | None = None,
    stream_groups: int | None = None,
) -> torch.Tensor:
    """The Triton form of `encoder_step_ref`: logits (B, L, V) in x's dtype, the pool rows `slots` advanced in place.
    `check=False` skips `check_slots` (no device sync; the caller vouches, as under CUDA graph capture).
    `persistent` (default: except in the interpreter) runs one launch with grid barriers, else a launch a phase.
    The grid holds NP programs for each of `stream_groups` groups of streams (stream b in group b % groups);
    default: as many groups as the SMs hold, at most B (one in the interpreter)."""
    _check(x, w, conv, ssm, slots)
    if check:
        check_slots(slots, conv.shape[1])
    persistent = not _interpreting() if persistent is None else persistent
    b, l, d = x.shape
    nl, s, h, p, n = ssm.shape
    k, v, r = w.conv_weight.shape[2], w.head_weight.shape[0], b * l
    n_programs = h * triton.cdiv(p, _BLOCK_P)
    sms = _sm_count(x.device) if x.device.type == "cuda" else n_programs
    groups = stream_groups if stream_groups is not None else max(1, min(b, sms // n_programs))
    if not 1 <= groups <= b:
        raise ValueError(f"stream_groups must be in [1, B={b}], got {groups}")
    if persistent and groups * n_programs > sms:
        raise ValueError(f"{groups} x {n_programs} programs do not fit on {sms} SMs at once")
    n_acc = nl * r * (d + 1)
    work = torch.zeros(n_acc + nl, device=x.device, dtype=torch.int32)  # one memset: accumulators and counters
    acc, sumsq = work[: nl * r * d].view(torch.float32), work[nl * r * d : n_acc].view(torch.float32)
    block_n = max(16, triton.next_power_of_2(n))
    scratch = torch.empty(groups * n_programs, MAX_ROWS, _BLOCK_P + 2 * block_n + 1, device=x.device)
    out = torch.empty(b, l, v, device=x.device, dtype=x.dtype)
    consts = dict(
        NL=nl, D=d, H=h, P=p, N=n, G=w.n_groups, K=k, L=l, V=v, BLOCK_R=MAX_ROWS,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_P=_BLOCK_P, BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(k - 1), BLOCK_V=max(16, triton.next_power_of_2(v)),
        PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=_WARPS,
    )  # fmt: skip
    args = (x.contiguous(), out, slots.contiguous(), conv, ssm, *(t.contiguous() for t in w.tensors()), acc, sumsq,
            scratch, work[n_acc:], b, s)  # fmt: skip
    phases = [(0, nl)] if persistent else [(i, i) for i in range(nl + 1)]
    for first, last in phases:
        _encoder_step_kernel[(groups * n_programs,)](*args, first, last, w.eps, SYNC=persistent, **consts)
    return out
