"""The causal Mamba-2 CTC encoder.

Every layer has `forward(x)` for training (whole sequences) and `chunk(x, state) -> (y, state)`
for streaming, where `state` is a typed structure owned by the caller, allocated once by
`ASRModel.init_state` and updated in place. Streaming any split of the input through `chunk`
gives the logits of one `forward` pass, within float tolerance.

`chunk` also takes `slots`: then `state` is a pool of S streams and only its rows `slots` are read and
written, so a server can step any subset of its streams without gathering or scattering their state.

Where the SSM runs (`Impl`): the pure-PyTorch reference (CPU, or asked for); on CUDA, the Triton
chunked scan (`kernels/ssd_scan.py`, training and long chunks) or the fused Triton step
(`kernels/step.py`, streaming chunks of up to 16 encoder frames, state read and written once a chunk), after
the Triton front-end step (`kernels/frontend.py`) for large batches.

Shapes: B batch, T feature frames (10 ms), L encoder frames (40 ms, T = 4 L), V vocabulary, S pool slots.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from asr.features import CMVN, N_MELS, SUBSAMPLING
from asr.ssm import causal_conv1d, causal_time_pad, gated_rms_norm, halved, rms_norm, ssd_scan
from asr.text import VOCAB
from kernels import encoder_step as triton_encoder
from kernels import frame_step as triton_frame
from kernels import frontend as triton_frontend
from kernels import ssd_scan as triton_scan
from kernels import step as triton_step
from kernels.encoder_step import EncoderWeights
from kernels.frontend import FrontEndWeights
from kernels.norm import add_rms_norm

# fused-step chunks of at least this many encoder frames (B L) take kernels/frontend: from 64 x 1 to 1,024 x 2 the
# graphed step took 5-18 % less than with cuDNN's convs; below 64 frames the two were within noise (session 10)
FRONTEND_KERNEL_MIN_FRAMES = 64


@dataclass(frozen=True)
class ModelDimensions:
    """The architecture, and nothing else; saved in every checkpoint's config."""

    n_mels: int = N_MELS
    vocab_size: int = len(VOCAB)
    d_model: int = 256
    n_layers: int = 12
    d_state: int = 64
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    d_conv: int = 4
    frontend_channels: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"ModelDimensions.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.d_inner % self.head_dim:
            raise ValueError(f"d_model * expand ({self.d_inner}) must be a multiple of head_dim ({self.head_dim})")
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_groups ({self.n_groups})")

    @property
    def d_inner(self) -> int:
        return self.d_model * self.expand

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the depthwise conv: x, B and C."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Impl(enum.Enum):
    """How a Mamba layer computes its SSM."""

    TORCH = "torch"  # asr.ssm reference math, any device
    SCAN = "scan"  # Triton chunked scan, CUDA
    STEP = "step"  # Triton fused streaming step on the state pool, CUDA, in pieces of triton_step.MAX_FRAMES

    @staticmethod
    def pick(x: torch.Tensor) -> Impl:
        """The streaming choice for input x: TORCH on the CPU, STEP on CUDA (every streaming caller, the server
        and `asr transcribe` alike, then runs the same float32 kernels). `forward` uses SCAN on CUDA."""
        return Impl.STEP if x.is_cuda else Impl.TORCH


def _scan(impl: Impl, x, dt, A, B, C, initial_state) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSM of `Mamba2Mixer._run` by impl SCAN (Triton) or TORCH (`asr.ssm.ssd_scan`): the same function, with
    the same arguments."""
    scan = triton_scan.ssd_scan if impl is Impl.SCAN else ssd_scan
    return scan(x, dt, A, B, C, initial_state=initial_state)


def _uncompiled_scan(impl: Impl, x, dt, A, B, C, initial_state) -> tuple[torch.Tensor, torch.Tensor]:
    """`_scan` for compiled blocks (`ASRModel.compile_blocks` keeps it out of their graphs, where its
    shape-dependent Python would cost a recompile per length): y comes back contiguous, so the compiled code after
    it sees one layout (the PyTorch scan's y is a slice of its padded blocks)."""
    y, final = _scan(impl, x, dt, A, B, C, initial_state)
    return y.contiguous(), final


def pad_features(feats: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """feats (B, T, n_mels) -> (B, ceil(T / 4) * 4, n_mels), padded with `mean` (n_mels,): `ASRModel.pad_features`."""
    pad = (-feats.shape[1]) % SUBSAMPLING
    if pad == 0:
        return feats
    return torch.cat([feats, mean.to(feats.dtype).expand(feats.shape[0], pad, -1)], dim=1)


def state_shapes(dims: ModelDimensions, batch: int) -> dict[str, tuple[int, ...]]:
    """The shapes of `batch` streams' state, a tensor a kind: conv1 (B, 1, 1, n_mels) and conv2 (B, C, 1,
    n_mels / 2) the front end's caches, conv (n_layers, B, conv_dim, d_conv - 1) and ssm (n_layers, B, n_heads,
    head_dim, d_state) every layer's."""
    d = dims
    return {
        "conv1": (batch, 1, 1, d.n_mels),
        "conv2": (batch, d.frontend_channels, 1, halved(d.n_mels)),
        "conv": (d.n_layers, batch, d.conv_dim, d.d_conv - 1),
        "ssm": (d.n_layers, batch, d.n_heads, d.head_dim, d.d_state),
    }


@dataclass
class FrontEndState:
    """Caches of the two causal stride-2 convs: the last input frame each saw."""

    conv1: torch.Tensor  # (B, 1, 1, n_mels)
    conv2: torch.Tensor  # (B, C, 1, halved(n_mels))


@dataclass
class MambaLayerState:
    conv: torch.Tensor  # (B, conv_dim, d_conv - 1), the model's dtype
    ssm: torch.Tensor  # (B, n_heads, head_dim, d_state), always float32


@dataclass
class EncoderState:
    """All streaming state of one batch of streams. Owned by the caller, updated in place."""

    frontend: FrontEndState
    layers: list[MambaLayerState]

    def tensors(self) -> list[torch.Tensor]:
        out = [self.frontend.conv1, self.frontend.conv2]
        for layer in self.layers:
            out += [layer.conv, layer.ssm]
        return out

    def zero_(self) -> EncoderState:
        for t in self.tensors():
            t.zero_()
        return self


def _layer_pools(state: EncoderState) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' conv caches and SSM states as the one-launch kernels take them: (NL, S, ...) each, no copy."""
    layers = state.layers
    return triton_encoder.stacked_pool([s.conv for s in layers]), triton_encoder.stacked_pool([s.ssm for s in layers])


def _in_pieces(fn, x: torch.Tensor, n: int) -> torch.Tensor:
    """fn over x (B, T, ...) in consecutive pieces of at most n steps along T, joined along T (one piece: no copy).
    Exact for the streaming kernels, which carry their state from one piece to the next."""
    pieces = [fn(x[:, i : i + n]) for i in range(0, x.shape[1], n)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _check_rows(slots: torch.Tensor | None, rows: int, batch: int, check: bool) -> None:
    """Raise ValueError unless the state fits: `slots` distinct rows of its `rows` (checked when `check`, a device
    sync, skipped during CUDA graph capture), or, without slots, exactly `batch` rows."""
    if slots is None:
        if rows != batch:
            raise ValueError(f"the state holds {rows} streams but the input {batch}; pass slots to use a pool")
    elif check and not (slots.is_cuda and torch.cuda.is_current_stream_capturing()):
        triton_step.check_slots(slots, rows)


class Subsampling(nn.Module):
    """Causal 4x front end: two 3x3 stride-2 convs over (time, mel), then a linear map to d_model.

    Output frame t sees input frames up to 4t + 3 and nothing later. In streaming each conv
    keeps one frame of left context, so chunks must hold a multiple of 4 frames.
    """

    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        c = dims.frontend_channels
        self.conv1 = nn.Conv2d(1, c, kernel_size=3, stride=2, padding=(0, 1))
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=2, padding=(0, 1))
        self.out = nn.Linear(c * halved(halved(dims.n_mels)), dims.d_model)

    def _run(self, x: torch.Tensor, state: FrontEndState | None) -> torch.Tensor:
        """x (B, T, n_mels) with T % 4 == 0 -> (B, T / 4, d_model)."""
        h = x.unsqueeze(1)
        h1 = causal_time_pad(h, state.conv1 if state else None)
        if state:
            state.conv1.copy_(h1[:, :, -1:])
        h = F.silu(self.conv1(h1))
        h2 = causal_time_pad(h, state.conv2 if state else None)
        if state:
            state.conv2.copy_(h2[:, :, -1:])
        h = F.silu(self.conv2(h2))
        return self.out(h.permute(0, 2, 1, 3).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)

    def chunk(
        self, x: torch.Tensor, state: FrontEndState, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, FrontEndState]:
        """x (B, 4 L, n_mels) -> (B, L, d_model). With `slots` (B,), `state` is a pool and rows `slots` are used."""
        if slots is None:
            return self._run(x, state), state
        rows = FrontEndState(state.conv1[slots], state.conv2[slots])  # two small caches: gathered, then written back
        y = self._run(x, rows)
        state.conv1.index_copy_(0, slots, rows.conv1)
        state.conv2.index_copy_(0, slots, rows.conv2)
        return y, state

    def step(
        self, feats: torch.Tensor, pool: FrontEndState, slots: torch.Tensor, mean: torch.Tensor, istd: torch.Tensor
    ) -> torch.Tensor:
        """feats (B, 4 L, n_mels) raw float32 log-mel -> (B, L, d_model): CMVN (mean, istd: (n_mels,)) and `chunk`
        by the Triton front-end kernels on rows `slots` (B,) (unchecked) of the pool (S rows, `FrontEndState`), in
        pieces of at most MAX_FRAMES output frames (exact: streaming equals offline)."""
        weights = (self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias, self.out.weight)

        def piece(x: torch.Tensor) -> torch.Tensor:
            args = (pool.conv1, pool.conv2, slots, mean, istd, *weights, self.out.bias)
            return triton_frontend.frontend_step(x, *args, check=False)

        return _in_pieces(piece, feats, SUBSAMPLING * triton_frontend.MAX_FRAMES)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Mamba2Mixer(nn.Module):
    """in_proj -> depthwise causal conv + SiLU -> selective SSM (+ D skip) -> gated RMSNorm -> out_proj."""

    scan = staticmethod(_scan)  # `ASRModel.compile_blocks` gives compiled mixers a version the compiler skips

    def __init__(self, dims: ModelDimensions, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.dims = dims
        d_in_proj = 2 * dims.d_inner + 2 * dims.n_groups * dims.d_state + dims.n_heads
        self.in_proj = nn.Linear(dims.d_model, d_in_proj, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(dims.conv_dim, dims.d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(dims.conv_dim))
        nn.init.uniform_(self.conv_weight, -1 / math.sqrt(dims.d_conv), 1 / math.sqrt(dims.d_conv))
        dt = torch.exp(torch.rand(dims.n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(dims.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(dims.n_heads))
        self.norm = RMSNorm(dims.d_inner)
        self.out_proj = nn.Linear(dims.d_inner, dims.d_model, bias=False)

    def _run(self, u: torch.Tensor, state: MambaLayerState | None, impl: Impl) -> torch.Tensor:
        """u (B, L, d_model) -> (B, L, d_model) by impl TORCH or SCAN; reads and rewrites `state` in place if given."""
        d = self.dims
        b, l, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([d.d_inner, d.conv_dim, d.n_heads], dim=-1)
        xbc, conv_cache = causal_conv1d(xbc, self.conv_weight, self.conv_bias, state.conv if state else None)
        x, B, C = xbc.split([d.d_inner, d.n_groups * d.d_state, d.n_groups * d.d_state], dim=-1)
        x = x.reshape(b, l, d.n_heads, d.head_dim)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y, final = self.scan(
            impl,
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(b, l, d.n_groups, d.d_state),
            C.reshape(b, l, d.n_groups, d.d_state),
            initial_state=state.ssm if state else None,
        )
        if state:
            state.conv.copy_(conv_cache)
            state.ssm.copy_(final)
        y = y + x.float() * self.D.float()[:, None]
        y = gated_rms_norm(y.reshape(b, l, d.d_inner), z, self.norm.weight, self.norm.eps)
        return self.out_proj(y.to(u.dtype))

    def step(self, u: torch.Tensor, pool: MambaLayerState, slots: torch.Tensor) -> torch.Tensor:
        """u (B, L, d_model) -> (B, L, d_model) by the fused Triton step on pool rows `slots` (unchecked), in
        pieces of at most triton_step.MAX_FRAMES frames (exact: streaming equals offline)."""
        y = _in_pieces(lambda zx: self._step_piece(zx, pool, slots), self.in_proj(u), triton_step.MAX_FRAMES)
        return self.out_proj(y)

    def _step_piece(self, zxbcdt: torch.Tensor, pool: MambaLayerState, slots: torch.Tensor) -> torch.Tensor:
        d = self.dims
        return triton_step.step(
            zxbcdt.contiguous(),
            pool.conv,
            pool.ssm,
            slots,
            self.conv_weight,
            self.conv_bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm.weight,
            d.n_groups,
            d.head_dim,
            self.norm.eps,
            check=False,  # checked once for all layers by the caller
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self._run(u, None, Impl.SCAN if u.is_cuda else Impl.TORCH)

    def chunk(
        self,
        u: torch.Tensor,
        state: MambaLayerState,
        slots: torch.Tensor | None = None,
        impl: Impl | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, MambaLayerState]:
        """u (B, L, d_model) -> (B, L, d_model), advancing `state` in place. With `slots` (B,) int64, distinct
        (which `check` verifies, as `ASRModel.chunk` does), `state` is a pool and only its rows `slots` are used;
        without, `state` must hold exactly B rows. `impl` defaults to `Impl.pick(u)`."""
        _check_rows(slots, state.ssm.shape[0], u.shape[0], check)
        impl = impl or Impl.pick(u)
        if impl is Impl.STEP:
            rows = slots if slots is not None else torch.arange(u.shape[0], device=u.device)
            return self.step(u, state, rows), state
        if slots is None:
            return self._run(u, state, impl), state
        rows = MambaLayerState(state.conv[slots], state.ssm[slots])
        y = self._run(u, rows, impl)
        state.conv.index_copy_(0, slots, rows.conv)
        state.ssm.index_copy_(0, slots, rows.ssm)
        return y, state


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x))."""

    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        self.norm = RMSNorm(dims.d_model)
        self.mixer = Mamba2Mixer(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))

    def chunk(
        self,
        x: torch.Tensor,
        state: MambaLayerState,
        slots: torch.Tensor | None = None,
        impl: Impl | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, MambaLayerState]:
        y, state = self.mixer.chunk(self.norm(x), state, slots, impl, check)
        return x + y, state


class ASRModel(nn.Module):
    """Log-mel (B, T, n_mels) -> CMVN -> causal 4x subsampling -> Mamba-2 blocks -> norm -> CTC logits."""

    def __init__(self, dims: ModelDimensions, cmvn: CMVN | None = None) -> None:
        super().__init__()
        self.dims = dims
        cmvn = cmvn if cmvn is not None else CMVN.identity()
        self.register_buffer("cmvn_mean", cmvn.mean.clone(), persistent=False)
        self.register_buffer("cmvn_istd", cmvn.istd.clone(), persistent=False)
        self.frontend = Subsampling(dims)
        self.layers = nn.ModuleList(MambaBlock(dims) for _ in range(dims.n_layers))
        self.norm_f = RMSNorm(dims.d_model)
        self.head = nn.Linear(dims.d_model, dims.vocab_size)
        for block in self.layers:  # scale residual branches by depth, as GPT-2 and Mamba do
            nn.init.normal_(block.mixer.out_proj.weight, std=0.02 / math.sqrt(dims.n_layers))

    @property
    def cmvn(self) -> CMVN:
        return CMVN(self.cmvn_mean.detach().cpu(), self.cmvn_istd.detach().cpu())

    def set_cmvn(self, cmvn: CMVN) -> None:
        self.cmvn_mean.copy_(cmvn.mean)
        self.cmvn_istd.copy_(cmvn.istd)

    @staticmethod
    def output_lengths(feature_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames for each input length: ceil(T / 4), as `forward` pads the tail."""
        return torch.div(feature_lengths + SUBSAMPLING - 1, SUBSAMPLING, rounding_mode="floor")

    def pad_features(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, T, n_mels) -> (B, ceil(T / 4) * 4, n_mels), padded with the CMVN mean.

        After normalisation the pad frames are zeros. Streaming pads the last partial chunk of a
        stream with this same function, so its final frame matches `forward`.
        """
        return pad_features(feats, self.cmvn_mean)

    def _normalize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.cmvn_mean) * self.cmvn_istd

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, T, n_mels) raw log-mel -> logits (B, ceil(T / 4), V)."""
        x = self.frontend(self._normalize(self.pad_features(feats)).to(self.head.weight.dtype))
        for block in self.layers:
            x = block(x)
        return self.head(self.norm_f(x))

    def init_state(self, batch: int, device: torch.device | str | None = None) -> EncoderState:
        """Allocate zeroed streaming state for `batch` streams (call once, then reuse)."""
        device = device if device is not None else self.head.weight.device

        def zeros(name: str, shape: tuple[int, ...]) -> torch.Tensor:  # the SSM state is float32 whatever the weights
            return torch.zeros(shape, device=device, dtype=torch.float32 if name == "ssm" else self.head.weight.dtype)

        t = {name: zeros(name, shape) for name, shape in state_shapes(self.dims, batch).items()}
        # each layer's state is a view of one tensor a kind, which the one-launch step (kernels/encoder_step.py) takes
        layers = [MambaLayerState(c, s) for c, s in zip(t["conv"], t["ssm"], strict=True)]
        return EncoderState(FrontEndState(t["conv1"], t["conv2"]), layers)

    def chunk(
        self,
        feats: torch.Tensor,
        state: EncoderState,
        slots: torch.Tensor | None = None,
        impl: Impl | None = None,
        check: bool = True,
        weights: EncoderWeights | None = None,
        log_probs: bool = False,
        work: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EncoderState]:
        """feats (B, 4 L, n_mels) raw log-mel -> logits (B, L, V), or with `log_probs` their log-softmax in float32;
        advances `state` in place.

        Without `slots`, `state` holds exactly these B streams. With `slots` (B,) int64, `state` is a pool
        (`init_state(S)`) and only its rows `slots` are read and written; they must be distinct, which `check`
        verifies (a device sync; it is skipped while a CUDA graph is being captured). `impl` defaults to
        `Impl.pick`; `Impl.TORCH` is the pure-PyTorch reference on any device. Under `Impl.STEP` each residual
        add is fused into the next RMSNorm (`kernels/norm.py`); with `weights` (this model's `encoder_weights()`)
        and B <= `encoder_step.max_streams` (4 on an H200), a one-frame chunk of a float32 or bfloat16 model runs
        as one launch from feats to logits, as matrix-vector products (`kernels/frame_step.py`); longer chunks run
        the Triton front end, then the layers and the head in one launch MAX_ROWS // B frames at a time
        (`kernels/encoder_step.py`). `work` is the one-frame launch's zeroed workspace (`kernels.frame_step.work_words`
        int32 words), which it leaves zeroed: a caller that keeps one (a CUDA graph) saves a memset a call.
        """
        if feats.shape[1] % SUBSAMPLING:
            raise ValueError(f"chunk() needs a multiple of {SUBSAMPLING} feature frames, got {feats.shape[1]}")
        if feats.shape[1] == 0:
            dtype = torch.float32 if log_probs else self.head.weight.dtype
            return feats.new_zeros(feats.shape[0], 0, self.dims.vocab_size, dtype=dtype), state
        _check_rows(slots, state.frontend.conv1.shape[0], feats.shape[0], check)
        impl = impl or Impl.pick(feats)
        rows = slots  # the fused kernels always address pool rows; without slots, the rows 0..B-1
        if impl is Impl.STEP and slots is None:
            rows = torch.arange(feats.shape[0], device=feats.device)
        one_launch = impl is Impl.STEP and weights is not None
        one_launch = one_launch and feats.shape[0] <= triton_encoder.max_streams(weights, feats.device)
        if one_launch and triton_frame.takes(feats, weights):
            return self._step_frame(feats.float(), state, rows, weights, log_probs, work), state
        logits = self._chunk_logits(feats, state, slots, rows, impl, weights if one_launch else None)
        return (logits.float().log_softmax(-1) if log_probs else logits), state

    def _chunk_logits(
        self,
        feats: torch.Tensor,
        state: EncoderState,
        slots: torch.Tensor | None,
        rows: torch.Tensor | None,
        impl: Impl,
        weights: EncoderWeights | None,
    ) -> torch.Tensor:
        """`chunk`'s logits (B, L, V) by every path but the one-frame launch: with `weights`, the tl.dot form."""
        x = self._chunk_frontend(feats, state, slots, rows, impl, weights is not None)
        if weights is not None:
            return self._step_encoder(x, state, rows, weights)
        if impl is Impl.STEP:
            return self.head(self._step_layers(x.contiguous(), state, rows))
        for block, layer_state in zip(self.layers, state.layers, strict=True):
            x, _ = block.chunk(x, layer_state, slots, impl, check=False)  # checked in chunk
        return self.head(self.norm_f(x))

    def _chunk_frontend(
        self,
        feats: torch.Tensor,
        state: EncoderState,
        slots: torch.Tensor | None,
        rows: torch.Tensor | None,
        impl: Impl,
        few_streams: bool = False,
    ) -> torch.Tensor:
        """feats (B, 4 L, n_mels) raw log-mel -> (B, L, d_model), advancing the front-end state: by the Triton
        front-end kernels on the fused-step path for `few_streams` (the one-launch encoder step's) and from
        FRONTEND_KERNEL_MIN_FRAMES encoder frames (B L) a chunk, on pool `rows`; else by CMVN and
        `Subsampling.chunk` on `slots` (cuDNN's convs on CUDA; without slots it uses the state directly, with no
        gather and write-back). BENCHMARKS.md, sessions 8 and 10."""
        frames = feats.shape[0] * (feats.shape[1] // SUBSAMPLING)
        if impl is Impl.STEP and (few_streams or frames >= FRONTEND_KERNEL_MIN_FRAMES):
            return self.frontend.step(feats.float(), state.frontend, rows, self.cmvn_mean, self.cmvn_istd)
        x, _ = self.frontend.chunk(self._normalize(feats).to(self.head.weight.dtype), state.frontend, slots)
        return x

    @staticmethod
    def _step_frame(
        feats: torch.Tensor,
        state: EncoderState,
        rows: torch.Tensor,
        w: EncoderWeights,
        log_probs: bool,
        work: torch.Tensor | None,
    ) -> torch.Tensor:
        """feats (B, 4, n_mels) raw float32 log-mel -> logits (B, 1, V), or their log-softmax: the whole model in one
        launch, as matrix-vector products (`kernels/frame_step.py`)."""
        front, pools = state.frontend, _layer_pools(state)
        return triton_frame.frame_step(
            feats, w, front.conv1, front.conv2, *pools, rows, check=False, log_probs=log_probs, work=work
        )

    @staticmethod
    def _step_encoder(x: torch.Tensor, state: EncoderState, rows: torch.Tensor, w: EncoderWeights) -> torch.Tensor:
        """x (B, L, d_model) -> logits (B, L, V) in one launch (after the Triton front end) by
        `kernels/encoder_step.py`, MAX_ROWS // B frames a launch."""
        conv, ssm = _layer_pools(state)

        def piece(xs: torch.Tensor) -> torch.Tensor:
            return triton_encoder.encoder_step(xs, w, conv, ssm, rows, check=False)

        return _in_pieces(piece, x, triton_encoder.MAX_ROWS // x.shape[0])

    def _step_layers(self, x: torch.Tensor, state: EncoderState, slots: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> norm_f's output, through every block's fused step; each residual add is done
        together with the next RMSNorm, in one kernel."""
        norms = [block.norm for block in self.layers] + [self.norm_f]
        _, h = add_rms_norm(x, None, norms[0].weight, norms[0].eps)
        for block, layer_state, norm in zip(self.layers, state.layers, norms[1:], strict=True):
            x, h = add_rms_norm(x, block.mixer.step(h, layer_state, slots), norm.weight, norm.eps)
        return h

    @torch.no_grad()
    def encoder_weights(self) -> EncoderWeights:
        """A copy of the blocks', norm_f's and the head's weights stacked over layers, in the model dtype, for the
        one-launch step (`chunk(..., weights=)`). A snapshot: take it again after changing the weights."""
        dtype = self.head.weight.dtype
        mixers = [block.mixer for block in self.layers]

        def stack(params) -> torch.Tensor:
            return torch.stack([p.detach().to(dtype) for p in params])

        norms = [block.norm for block in self.layers] + [m.norm for m in mixers] + [self.norm_f]
        if len({n.eps for n in norms}) != 1:
            raise ValueError("the one-launch step needs one eps for every RMSNorm")
        return EncoderWeights(
            norm=stack(block.norm.weight for block in self.layers), in_proj=stack(m.in_proj.weight for m in mixers),
            conv_weight=stack(m.conv_weight for m in mixers), conv_bias=stack(m.conv_bias for m in mixers),
            dt_bias=stack(m.dt_bias for m in mixers), A_log=stack(m.A_log for m in mixers),
            D=stack(m.D for m in mixers),
            gated_norm=stack(m.norm.weight for m in mixers), out_proj=stack(m.out_proj.weight for m in mixers),
            norm_f=self.norm_f.weight.detach().clone(), head_weight=self.head.weight.detach().clone(),
            head_bias=self.head.bias.detach().clone(), n_groups=self.dims.n_groups, head_dim=self.dims.head_dim,
            eps=self.norm_f.eps, front=self._frontend_weights(),
        )  # fmt: skip

    def _frontend_weights(self) -> FrontEndWeights:
        f = self.frontend
        tensors = (self.cmvn_mean, self.cmvn_istd, f.conv1.weight, f.conv1.bias, f.conv2.weight, f.conv2.bias,
                   f.out.weight, f.out.bias)  # fmt: skip
        return FrontEndWeights(*(t.detach().clone() for t in tensors))

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each block's `forward` (training) for any batch size and length: the elementwise work
        around the scan (conv, gates, norms, residual) fuses into a few kernels per block. The front end, head
        and scan stay as they are (the scan through `torch.compiler.disable`, applied here so that importing this
        module does not load the compiler). Block 0's input is a view and the others' are not, so guards come in
        pairs; inductor adds size guards (B L >= 644 and >= 20,480 encoder frames): a few graphs a run, each
        compiled once."""
        skipped = torch.compiler.disable(_uncompiled_scan)
        for block in self.layers:
            block.mixer.scan = skipped
            block.compile(backend=backend, dynamic=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
