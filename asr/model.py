"""The causal Mamba-2 CTC encoder.

Every layer has `forward(x)` for training (whole sequences) and `chunk(x, state) -> (y, state)`
for streaming, where `state` is a typed structure owned by the caller, allocated once by
`ASRModel.init_state` and updated in place. Streaming any split of the input through `chunk`
gives the logits of one `forward` pass, within float tolerance.

Shapes: B batch, T feature frames (10 ms), L encoder frames (40 ms, T = 4 L), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from asr.features import CMVN, N_MELS, SUBSAMPLING
from asr.ssm import causal_conv1d, gated_rms_norm, rms_norm, ssd_scan
from asr.text import VOCAB
from kernels import ssd_scan as triton_scan


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


@dataclass
class FrontEndState:
    """Caches of the two causal stride-2 convs: the last input frame each saw."""

    conv1: torch.Tensor  # (B, 1, 1, n_mels)
    conv2: torch.Tensor  # (B, C, 1, n_mels // 2)


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

    def select(self, rows: torch.Tensor) -> EncoderState:
        """A new state holding copies of `rows` (slot indices) of this one."""
        pick = [t.index_select(0, rows) for t in self.tensors()]
        return _state_from(pick, len(self.layers))

    def assign_(self, rows: torch.Tensor, other: EncoderState) -> None:
        """Write `other` (len(rows) streams) into `rows` of this state, in place."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.index_copy_(0, rows, theirs)


def _state_from(tensors: list[torch.Tensor], n_layers: int) -> EncoderState:
    layers = [MambaLayerState(tensors[2 + 2 * i], tensors[3 + 2 * i]) for i in range(n_layers)]
    return EncoderState(FrontEndState(tensors[0], tensors[1]), layers)


def _halved(n: int) -> int:
    """Size after a kernel-3, stride-2 conv with one frame of padding on each side."""
    return (n - 1) // 2 + 1


def _causal_time_pad(x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, T, F): prepend the cached frame (or a zero frame at the start of a stream)."""
    if cache is None:
        return F.pad(x, (0, 0, 1, 0))
    return torch.cat([cache.to(x.dtype), x], dim=2)


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
        self.out = nn.Linear(c * _halved(_halved(dims.n_mels)), dims.d_model)

    def _run(self, x: torch.Tensor, state: FrontEndState | None) -> torch.Tensor:
        """x (B, T, n_mels) with T % 4 == 0 -> (B, T / 4, d_model)."""
        h = x.unsqueeze(1)
        h1 = _causal_time_pad(h, state.conv1 if state else None)
        if state:
            state.conv1.copy_(h1[:, :, -1:])
        h = F.silu(self.conv1(h1))
        h2 = _causal_time_pad(h, state.conv2 if state else None)
        if state:
            state.conv2.copy_(h2[:, :, -1:])
        h = F.silu(self.conv2(h2))
        return self.out(h.permute(0, 2, 1, 3).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)

    def chunk(self, x: torch.Tensor, state: FrontEndState) -> tuple[torch.Tensor, FrontEndState]:
        return self._run(x, state), state


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Mamba2Mixer(nn.Module):
    """in_proj -> depthwise causal conv + SiLU -> selective SSM (+ D skip) -> gated RMSNorm -> out_proj."""

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

    def _run(self, u: torch.Tensor, state: MambaLayerState | None) -> torch.Tensor:
        """u (B, L, d_model) -> (B, L, d_model); reads and rewrites `state` in place if given."""
        d = self.dims
        b, l, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([d.d_inner, d.conv_dim, d.n_heads], dim=-1)
        xbc, conv_cache = causal_conv1d(xbc, self.conv_weight, self.conv_bias, state.conv if state else None)
        x, B, C = xbc.split([d.d_inner, d.n_groups * d.d_state, d.n_groups * d.d_state], dim=-1)
        x = x.reshape(b, l, d.n_heads, d.head_dim)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        scan = triton_scan.ssd_scan if x.is_cuda else ssd_scan  # same function; Triton on CUDA
        y, final = scan(
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

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self._run(u, None)

    def chunk(self, u: torch.Tensor, state: MambaLayerState) -> tuple[torch.Tensor, MambaLayerState]:
        return self._run(u, state), state


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x))."""

    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        self.norm = RMSNorm(dims.d_model)
        self.mixer = Mamba2Mixer(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))

    def chunk(self, x: torch.Tensor, state: MambaLayerState) -> tuple[torch.Tensor, MambaLayerState]:
        y, state = self.mixer.chunk(self.norm(x), state)
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
        pad = (-feats.shape[1]) % SUBSAMPLING
        if pad == 0:
            return feats
        fill = self.cmvn_mean.to(feats.dtype).expand(feats.shape[0], pad, -1)
        return torch.cat([feats, fill], dim=1)

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
        d = self.dims
        device = device if device is not None else self.head.weight.device
        dtype = self.head.weight.dtype
        c, half = d.frontend_channels, _halved(d.n_mels)
        frontend = FrontEndState(
            conv1=torch.zeros(batch, 1, 1, d.n_mels, device=device, dtype=dtype),
            conv2=torch.zeros(batch, c, 1, half, device=device, dtype=dtype),
        )
        layers = [
            MambaLayerState(
                conv=torch.zeros(batch, d.conv_dim, d.d_conv - 1, device=device, dtype=dtype),
                ssm=torch.zeros(batch, d.n_heads, d.head_dim, d.d_state, device=device, dtype=torch.float32),
            )
            for _ in range(d.n_layers)
        ]
        return EncoderState(frontend, layers)

    def chunk(self, feats: torch.Tensor, state: EncoderState) -> tuple[torch.Tensor, EncoderState]:
        """feats (B, 4 L, n_mels) raw log-mel -> logits (B, L, V); advances `state` in place."""
        if feats.shape[1] % SUBSAMPLING:
            raise ValueError(f"chunk() needs a multiple of {SUBSAMPLING} feature frames, got {feats.shape[1]}")
        if feats.shape[1] == 0:
            return feats.new_zeros(feats.shape[0], 0, self.dims.vocab_size, dtype=self.head.weight.dtype), state
        x, _ = self.frontend.chunk(self._normalize(feats).to(self.head.weight.dtype), state.frontend)
        for block, layer_state in zip(self.layers, state.layers, strict=True):
            x, _ = block.chunk(x, layer_state)
        return self.head(self.norm_f(x)), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
