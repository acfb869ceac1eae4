"""The chunked selective scan (Mamba-2 "SSD") as Triton kernels, forward and backward.

Same function as `asr.ssm.ssd_scan` (`_ref` below). Shapes: b batch, l time, h heads, p head_dim,
g groups (head j reads group j // (h // g)), n d_state; x (b, l, h, p), dt (b, l, h) after
softplus, A (h,) negative, B and C (b, l, g, n), state (b, h, p, n) float32.

Forward: one program per (batch, head) walks the chunks of Q time steps in order and keeps the
state S (p, n) in registers. With xdt = x * dt (Q, p), a = cumsum(dt * A) within the chunk (Q,),
a_Q its last value and L[l, s] = exp(a_l - a_s) for s <= l (else 0), one chunk is

    y  = (L * C B^T) @ xdt + exp(a)[:, None] * (C @ S0^T)                  (Q, p)
    S1 = exp(a_Q) S0 + (xdt * exp(a_Q - a)[:, None])^T @ B                  (p, n)

Every exponent is <= 0, so nothing overflows. Steps past l load dt = x = B = C = 0, which leaves
the state unchanged, so the final state is exact for any l. The state entering each chunk is
stored (b, h, nchunks, p, n) for the backward pass.

Backward: one program per (batch, head) walks the chunks in reverse and carries dS, the gradient
of the state leaving the chunk (zero after the last chunk: the final state is not
differentiated). With G = L * C B^T, M = dy @ xdt^T and D = L * M:

    dS0  = exp(a_Q) dS1 + dy^T @ (C * exp(a)[:, None])
    dxdt = G^T @ dy + exp(a_Q - a)[:, None] * (B @ dS1^T)
    dC   = D @ B + exp(a)[:, None] * (dy @ S0)
    dB   = D^T @ C + exp(a_Q - a)[:, None] * (xdt @ dS1)
    da_l = rowsum(G * M)_l - colsum(G * M)_l + exp(a_l) <dy_l, C_l S0^T> - exp(a_Q - a_l) <xdt_l, B_l dS1^T>
    da_Q = exp(a_Q) <dS1, S0> + sum_s exp(a_Q - a_s) <xdt_s, B_s dS1^T>

a_l depends on dtA_t for t <= l and a_Q on the whole chunk, so d(dtA)_t = sum_{l >= t} da_l + da_Q;
then ddt = d(dtA) * A + <dxdt, x>, dx = dxdt * dt and dA = sum d(dtA) * dt. dB, dC and dA are
written per head and summed over the heads of each group (and the batch, for dA) in PyTorch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from asr.ssm import ssd_scan as _ref

__all__ = ["ssd_scan", "_ref"]

# Fixed launch settings (no autotuning). At Q = p = n = 64, 8 warps spill least; loads are not software-pipelined
# anyway (only dt would be), so one stage saves the registers that pipelining costs.
_NUM_WARPS = 8
_NUM_STAGES = 1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Time steps per chunk. At 64 the backward kernel spills ~1.9 KB a thread on sm_90; at 32 it spills
# ~0.5 KB and fwd+bwd runs 1.7 ms against 2.3 ms (bench/scan.py, H200). Results do not depend on it.
CHUNK = 32


@triton.jit
def _load_rows(ptr, t, l, row_stride, cols, ncols):
    """Rows t (Q,) of a (l, row_stride) slab, columns cols -> (Q, len(cols)) float32, 0 outside."""
    mask = (t[:, None] < l) & (cols[None, :] < ncols)
    return tl.load(ptr + t[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, val, t, l, row_stride, cols, ncols):
    """The inverse of _load_rows: val (Q, len(cols)) into rows t, columns cols, within (l, ncols)."""
    mask = (t[:, None] < l) & (cols[None, :] < ncols)
    tl.store(ptr + t[:, None] * row_stride + cols[None, :], val, mask=mask)


@triton.jit
def _state_offsets(rows, cols, p, n):
    """Offsets and mask of a (p, n) row-major state."""
    return rows[:, None] * n + cols[None, :], (rows[:, None] < p) & (cols[None, :] < n)


@triton.jit
def _load_chunk(x_ptr, dt_ptr, B_ptr, C_ptr, t, l, h, g, p, n, rp, rn):
    """One chunk's inputs (base pointers already at this batch and head/group): x (Q, p), dt (Q,), B, C (Q, n)."""
    x = _load_rows(x_ptr, t, l, h * p, rp, p)
    dt = tl.load(dt_ptr + t * h, mask=t < l, other=0.0).to(tl.float32)
    B = _load_rows(B_ptr, t, l, g * n, rn, n)
    C = _load_rows(C_ptr, t, l, g * n, rn, n)
    return x, dt, B, C


@triton.jit
def _decays(dt, A, Q: tl.constexpr):
    """a = cumsum(dt * A) (Q,), a_Q = its total, and L (Q, Q) = exp(a_l - a_s) for s <= l, else 0."""
    a = tl.cumsum(dt * A, axis=0)
    a_last = tl.sum(dt * A, axis=0)
    idx = tl.arange(0, Q)
    L = tl.exp(tl.where(idx[:, None] >= idx[None, :], a[:, None] - a[None, :], float("-inf")))
    return a, a_last, L


@triton.jit
def _bases(pid, l, h, g, p, n):
    """Program pid = (batch, head) -> head index and element offsets of its (l, ...) slabs in
    x-like (b, l, h, p), dt-like (b, l, h), B-like (b, l, g, n) and per-head (b, l, h, n) tensors."""
    bi = (pid // h).to(tl.int64)
    hi = pid % h
    gi = hi // (h // g)
    return hi, bi * l * h * p + hi * p, bi * l * h + hi, bi * l * g * n + gi * n, bi * l * h * n + hi * n


@triton.jit
def _fwd_chunk(x, dt, A, B, C, S, Q: tl.constexpr, PRECISION: tl.constexpr):
    """x (Q, p), dt (Q,), B, C (Q, n), S (p, n) entering -> y (Q, p), S leaving."""
    a, a_last, L = _decays(dt, A, Q)
    xdt = x * dt[:, None]
    G = tl.dot(C, tl.trans(B), input_precision=PRECISION) * L
    y = tl.dot(G, xdt, input_precision=PRECISION)
    y += tl.exp(a)[:, None] * tl.dot(C, tl.trans(S), input_precision=PRECISION)
    to_end = xdt * tl.exp(a_last - a)[:, None]
    S = tl.exp(a_last) * S + tl.dot(tl.trans(to_end), B, input_precision=PRECISION)
    return y, S


@triton.jit
def _ssd_fwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    init_ptr,
    y_ptr,
    states_ptr,
    final_ptr,
    l,
    h,
    g,
    p,
    n,
    nchunks,
    Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (b * h,). Writes y (b, l, h, p), states (b, h, nchunks, p, n) entering each chunk and
    final (b, h, p, n); init (b, h, p, n) is the state before step 0."""
    pid = tl.program_id(0)
    hi, x_base, dt_base, bc_base, _ = _bases(pid, l, h, g, p, n)
    A = tl.load(A_ptr + hi).to(tl.float32)
    rp = tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    s_offs, s_mask = _state_offsets(rp, rn, p, n)
    state_base = pid.to(tl.int64) * p * n
    states_ptr += state_base * nchunks
    S = tl.load(init_ptr + state_base + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    for c in range(nchunks):
        t = c * Q + tl.arange(0, Q)
        x, dt, B, C = _load_chunk(
            x_ptr + x_base, dt_ptr + dt_base, B_ptr + bc_base, C_ptr + bc_base, t, l, h, g, p, n, rp, rn
        )
        tl.store(states_ptr + c * p * n + s_offs, S, mask=s_mask)
        y, S = _fwd_chunk(x, dt, A, B, C, S, Q, PRECISION)
        _store_rows(y_ptr + x_base, y, t, l, h * p, rp, p)
    tl.store(final_ptr + state_base + s_offs, S, mask=s_mask)


@triton.jit
def _bwd_scores(xdt, B, C, dy, S0, dS, ea, to_end, L, dB_ptr, dC_ptr, t, l, h, n, rn, PRECISION: tl.constexpr):
    """The gradients through the (Q, Q) score matrices. xdt, dy (Q, p), B, C (Q, n), S0 (p, n) entering,
    dS (p, n) of the state leaving, ea = exp(a), to_end = exp(a_Q - a) (Q,), L (Q, Q). Stores dB and dC
    (Q, n); returns G = L * C B^T and rowsum(G * M) - colsum(G * M) (Q,), with M = dy xdt^T."""
    G = tl.dot(C, tl.trans(B), input_precision=PRECISION) * L
    M = tl.dot(dy, tl.trans(xdt), input_precision=PRECISION)
    GM = G * M
    da = tl.sum(GM, axis=1) - tl.sum(GM, axis=0)
    D = M * L
    dC = tl.dot(D, B, input_precision=PRECISION) + ea[:, None] * tl.dot(dy, S0, input_precision=PRECISION)
    _store_rows(dC_ptr, dC, t, l, h * n, rn, n)
    dB = tl.dot(tl.trans(D), C, input_precision=PRECISION) + to_end[:, None] * tl.dot(
        xdt, dS, input_precision=PRECISION
    )
    _store_rows(dB_ptr, dB, t, l, h * n, rn, n)
    return G, da


@triton.jit
def _ssd_bwd_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    states_ptr,
    dy_ptr,
    dx_ptr,
    ddt_ptr,
    dB_ptr,
    dC_ptr,
    dA_ptr,
    l,
    h,
    g,
    p,
    n,
    nchunks,
    Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (b * h,). Reads states (b, h, nchunks, p, n) and dy (b, l, h, p); writes dx (b, l, h, p),
    ddt (b, l, h), per-head dB and dC (b, l, h, n) and per-(batch, head) dA (b * h,), all float32.
    Outputs are stored as soon as they are known, to keep few (Q, .) blocks live at once."""
    pid = tl.program_id(0)
    hi, x_base, dt_base, bc_base, hn_base = _bases(pid, l, h, g, p, n)
    A = tl.load(A_ptr + hi).to(tl.float32)
    rp = tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    s_offs, s_mask = _state_offsets(rp, rn, p, n)
    states_ptr += pid.to(tl.int64) * nchunks * p * n
    dS = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # gradient of the state leaving the chunk
    dA = tl.zeros((Q,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        t = c * Q + tl.arange(0, Q)
        x, dt, B, C = _load_chunk(
            x_ptr + x_base, dt_ptr + dt_base, B_ptr + bc_base, C_ptr + bc_base, t, l, h, g, p, n, rp, rn
        )
        dy = _load_rows(dy_ptr + x_base, t, l, h * p, rp, p)
        S0 = tl.load(states_ptr + c * p * n + s_offs, mask=s_mask, other=0.0)
        a, a_last, L = _decays(dt, A, Q)
        ea = tl.exp(a)
        to_end = tl.exp(a_last - a)
        xdt = x * dt[:, None]
        G, da = _bwd_scores(
            xdt, B, C, dy, S0, dS, ea, to_end, L, dB_ptr + hn_base, dC_ptr + hn_base, t, l, h, n, rn, PRECISION
        )
        BdS = tl.dot(B, tl.trans(dS), input_precision=PRECISION)  # (Q, p)
        dxdt = tl.dot(tl.trans(G), dy, input_precision=PRECISION) + to_end[:, None] * BdS
        leave = to_end * tl.sum(xdt * BdS, axis=1)  # exp(a_Q - a_s) <xdt_s, B_s dS^T>
        da += ea * tl.sum(dy * tl.dot(C, tl.trans(S0), input_precision=PRECISION), axis=1) - leave
        da_last = tl.exp(a_last) * tl.sum(tl.sum(dS * S0, axis=1), axis=0) + tl.sum(leave, axis=0)
        ddtA = tl.cumsum(da, axis=0, reverse=True) + da_last  # d(dt * A)
        _store_rows(dx_ptr + x_base, dxdt * dt[:, None], t, l, h * p, rp, p)
        tl.store(ddt_ptr + dt_base + t * h, ddtA * A + tl.sum(dxdt * x, axis=1), mask=t < l)
        dA += ddtA * dt
        dS = tl.exp(a_last) * dS + tl.dot(tl.trans(dy), C * ea[:, None], input_precision=PRECISION)
    tl.store(dA_ptr + pid, tl.sum(dA, axis=0))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(p: int, n: int, chunk_size: int) -> dict:
    """Constexprs shared by both kernels: p and n padded to powers of two >= 16 (tl.dot's minimum)."""
    return dict(
        Q=chunk_size,
        BLOCK_P=max(16, triton.next_power_of_2(p)),
        BLOCK_N=max(16, triton.next_power_of_2(n)),
        PRECISION="ieee" if _interpreting() else "tf32",
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )


class _SSDScan(torch.autograd.Function):
    """Inputs already checked and contiguous; saves the chunk-entry states for the backward pass."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, chunk_size):
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        nchunks = triton.cdiv(l, chunk_size)
        y = torch.empty(b, l, h, p, device=x.device, dtype=torch.float32)
        states = torch.empty(b, h, nchunks, p, n, device=x.device, dtype=torch.float32)
        final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
        if initial_state is None:
            initial_state = torch.zeros_like(final)
        cfg = _launch_config(p, n, chunk_size)
        _ssd_fwd_kernel[(b * h,)](x, dt, A, B, C, initial_state, y, states, final, l, h, g, p, n, nchunks, **cfg)
        ctx.save_for_backward(x, dt, A, B, C, states)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(final)
        return y, final

    @staticmethod
    def backward(ctx, dy, _dfinal):
        x, dt, A, B, C, states = ctx.saved_tensors
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        f32 = dict(device=x.device, dtype=torch.float32)
        dx, ddt = torch.empty(b, l, h, p, **f32), torch.empty(b, l, h, **f32)
        dB, dC, dA = torch.empty(b, l, h, n, **f32), torch.empty(b, l, h, n, **f32), torch.empty(b, h, **f32)
        cfg = _launch_config(p, n, ctx.chunk_size)
        _ssd_bwd_kernel[(b * h,)](
            x, dt, A, B, C, states, dy.contiguous(), dx, ddt, dB, dC, dA, l, h, g, p, n, states.shape[2], **cfg
        )
        dB = dB.view(b, l, g, h // g, n).sum(3)
        dC = dC.view(b, l, g, h // g, n).sum(3)
        return dx.to(x.dtype), ddt.to(dt.dtype), dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), None, None


def _check(x, dt, A, B, C, initial_state, chunk_size) -> None:
    """Raise ValueError unless the arguments have the shapes, dtypes and devices that ssd_scan needs."""
    if x.dim() != 4:
        raise ValueError(f"x must be (b, l, h, p), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must be (b, l, g, n) = ({b}, {l}, g, n) to match x, got {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g:
        raise ValueError(f"the number of heads h={h} must be a multiple of the number of groups g={g}")
    expected = {"dt": (b, l, h), "A": (h,), "C": (b, l, g, n)}
    if initial_state is not None:
        expected["initial_state"] = (b, h, p, n)
    named = {"dt": dt, "A": A, "C": C, "initial_state": initial_state}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} to match x {tuple(x.shape)} and B {tuple(B.shape)}, "
                f"got {tuple(named[name].shape)}"
            )
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if initial_state is not None and initial_state.requires_grad:
        raise ValueError("initial_state must not require grad: the Triton scan does not differentiate it (detach it)")
    tensors = {"x": x, "B": B, **{k: v for k, v in named.items() if v is not None}}
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"all tensors must be on one device: x is on {x.device}, {name} on {t.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"ssd_scan needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `asr.ssm.ssd_scan`, differentiable in x, dt, A, B and C.

    x (b, l, h, p), dt (b, l, h) after softplus, A (h,) negative, B and C (b, l, g, n),
    initial_state (b, h, p, n) or None (zeros; never differentiated). Returns y (b, l, h, p)
    float32 without the D skip, and the final state (b, h, p, n) float32 (not differentiable).
    """
    _check(x, dt, A, B, C, initial_state, chunk_size)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    return _SSDScan.apply(x, dt, A, B, C, initial_state, chunk_size)
