"""Reference math for the Mamba-2 layer, in pure PyTorch.

This is the one place the layer's arithmetic is defined. The model uses these functions on the
CPU, and every Triton kernel's `_ref` is checked against them.

Shapes: b batch, l time, h heads, p head_dim, g groups (h % g == 0), n d_state, c channels,
k conv width. The SSM state is always float32, whatever the input dtype.

Recurrence (per head, per time step):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T        state: (p, n)
    y_t     = state_t C_t                                          y: (p,)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCAN_CHUNK = 64  # time steps per block of the chunked parallel scan


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., d), weight (d,) -> (..., d), computed in float32 and cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm(y * silu(z)) * weight (Mamba-2's gate, applied before the norm). y, z (..., d)."""
    return rms_norm(y.float() * F.silu(z.float()), weight, eps).to(y.dtype)


def halved(n: int) -> int:
    """Size after a kernel-3, stride-2 conv with one frame of padding on each side."""
    return (n - 1) // 2 + 1


def causal_time_pad(x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, T, F): prepend the cached frame (or a zero frame at the start of a stream)."""
    if cache is None:
        return F.pad(x, (0, 0, 1, 0))
    return torch.cat([cache.to(x.dtype), x], dim=2)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cache: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time, then SiLU, in x's dtype.

    x (b, l, c), weight (c, k), bias (c,), cache (b, c, k - 1): the k - 1 inputs before x
    (zeros at the start of a stream). Returns y (b, l, c) and the new cache (b, c, k - 1).
    Written as k shifted multiply-adds in (b, l, c) layout, which a compiler fuses into one kernel
    (cuDNN's depthwise conv, forward and backward, was a tenth of a training step's GPU time).
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    past = x.new_zeros(b, k - 1, c) if cache is None else cache.transpose(1, 2).to(x.dtype)
    padded = torch.cat([past, x], dim=1)  # (b, k - 1 + l, c)
    y = padded[:, :l] * weight[:, 0] if bias is None else torch.addcmul(bias, padded[:, :l], weight[:, 0])
    for i in range(1, k):
        y = y + padded[:, i : i + l] * weight[:, i]
    return F.silu(y).to(x.dtype), padded[:, padded.shape[1] - (k - 1) :].transpose(1, 2)


def ssm_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan as a plain loop over time: the ground truth for the faster forms.

    x (b, l, h, p), dt (b, l, h) after softplus, A (h,) negative, B and C (b, l, g, n),
    initial_state (b, h, p, n). Returns y (b, l, h, p) float32 without the D skip, and the
    final state (b, h, p, n) float32.
    """
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    Bh = B.float().repeat_interleave(rep, dim=2)
    Ch = C.float().repeat_interleave(rep, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32) if initial_state is None else initial_state
    state = state.float()
    ys = []
    for t in range(l):
        dtt = dt[:, t].float()
        decay = torch.exp(dtt * A.float())[..., None, None]
        state = state * decay + (dtt[..., None] * x[:, t].float())[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=torch.float32)
    return y, state


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = SCAN_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as `ssm_scan_ref`, as Mamba-2's chunked parallel scan (SSD).

    Within a block of `chunk_size` steps the scan is a masked matrix product; the blocks are
    then linked by a short recurrence over their boundary states. Padding steps get dt = 0,
    which leaves the state untouched, so the final state is exact for any length. Input shorter
    than a block (a streaming chunk) is one block of its own length, with nothing wasted on padding.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    chunk_size = max(1, min(chunk_size, l))
    pad = (-l) % chunk_size
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc, q = (l + pad) // chunk_size, chunk_size
    xdt = (x * dt[..., None]).view(b, nc, q, g, r, p)
    a_cs = (dt * A.float()).view(b, nc, q, g, r).cumsum(dim=2)  # log-decay from chunk start
    Bc, Cc = B.view(b, nc, q, g, n), C.view(b, nc, q, g, n)

    # 1. Within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_l - a_s) xdt_s
    seg = a_cs.permute(0, 1, 3, 4, 2)  # (b, c, g, r, q)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    log_decay = (seg[..., :, None] - seg[..., None, :]).masked_fill(~causal, float("-inf"))
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)[:, :, :, None] * log_decay.exp()
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, xdt)

    # 2. Each chunk's contribution to the state at its end.
    to_end = torch.exp(a_cs[:, :, -1:] - a_cs)  # (b, c, q, g, r)
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, xdt * to_end[..., None])

    # 3. Link the chunks: the state entering each chunk.
    state = x.new_zeros(b, g, r, p, n) if initial_state is None else initial_state.float().reshape(b, g, r, p, n)
    chunk_decay = torch.exp(a_cs[:, :, -1])[..., None, None]  # (b, c, g, r, 1, 1)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[:, c] * state + chunk_states[:, c]

    # 4. What the entering state adds inside each chunk.
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cc, torch.stack(entering, dim=1)) * a_cs.exp()[..., None]
    return y.reshape(b, nc * q, h, p)[:, :l], state.reshape(b, h, p, n)
