"""ONNX export of the streaming step, and a runner for the exported file (onnxruntime).

The exported graph is `ASRModel.chunk` without slots: L encoder frames (any L >= 1) of B streams (any B), from raw
log-mel to logits, with every piece of streaming state an input and its next value an output. The caller carries
the state from one call to the next, as the server carries a stream's state between chunks. Streaming through it
in chunks of any size gives the offline forward's logits within float tolerance (tests/test_export_onnx.py).

Inputs, all float32:
- feats (B, 4 L, n_mels): raw log-mel (CMVN is inside the graph);
- conv1 (B, 1, 1, n_mels) and conv2 (B, C, 1, ceil(n_mels / 2)): the front end's conv caches;
- conv (n_layers, B, conv_dim, d_conv - 1): every layer's conv cache;
- ssm (n_layers, B, n_heads, head_dim, d_state): every layer's SSM state.

Outputs: logits (B, L, vocab), then conv1_out, conv2_out, conv_out and ssm_out, the state after the chunk.

The model's config.json (dimensions, feature settings, CMVN statistics, vocabulary) is stored in the file's
metadata under `asr_config`, so the file alone is a whole model for a runtime (`OnnxModel.config`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from asr.checkpoint import ModelConfig, ModelLoadError, parse_config
from asr.features import SUBSAMPLING
from asr.model import ASRModel, EncoderState, FrontEndState, Impl, MambaLayerState, ModelDimensions, state_shapes
from asr.model import pad_features as pad_with_mean

STATE_NAMES = ("conv1", "conv2", "conv", "ssm")
_BATCH_AXIS = {"conv1": 0, "conv2": 0, "conv": 1, "ssm": 1}  # each state input's axis of streams
INPUT_NAMES = ("feats", *STATE_NAMES)
OUTPUT_NAMES = ("logits", *(f"{name}_out" for name in STATE_NAMES))
METADATA_KEY = "asr_config"
_EXAMPLE_FRAMES = 4  # encoder frames of the example chunk the exporter traces (the exported graph takes any)
_MAX_DIM = 1 << 20  # bound on the dynamic batch and frame counts (the exporter needs one; it constrains nothing real)


@dataclass
class OnnxState:
    """All streaming state of B streams for the exported graph (shapes in the module docstring), float32 arrays.
    Owned by the caller; `OnnxModel.chunk` replaces them with the next state's."""

    conv1: np.ndarray
    conv2: np.ndarray
    conv: np.ndarray
    ssm: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in STATE_NAMES}


class _FlatStep(nn.Module):
    """`ASRModel.chunk` (the pure-PyTorch path) over the flat state tensors, which it leaves unchanged: an ONNX
    graph returns the next state instead of writing it in place."""

    def __init__(self, model: ASRModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, feats: torch.Tensor, conv1: torch.Tensor, conv2: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        layers = [MambaLayerState(c.clone(), s.clone()) for c, s in zip(conv.unbind(0), ssm.unbind(0), strict=True)]
        state = EncoderState(FrontEndState(conv1.clone(), conv2.clone()), layers)
        logits, state = self.model.chunk(feats, state, impl=Impl.TORCH)
        return logits, state.frontend.conv1, state.frontend.conv2, *_stacked(state)


def export_onnx(model: ASRModel, config: ModelConfig, path: str | Path) -> Path:
    """Write `model` (float32, on the CPU) as an ONNX graph of one streaming chunk to `path` (the exporter's
    opset: 20 with torch 2.11), with `config` in its metadata: its vocabulary, feature settings and provenance, and
    the model's own dimensions and CMVN statistics (the graph's). Returns the path."""
    if model.head.weight.dtype != torch.float32 or model.head.weight.device.type != "cpu":
        raise ValueError("export_onnx takes a float32 model on the CPU (load_model's default)")
    if config.dims != model.dims:
        raise ValueError(f"config.dims {config.dims} are not the model's {model.dims}")
    state = model.init_state(1, "cpu")
    feats = torch.zeros(1, SUBSAMPLING * _EXAMPLE_FRAMES, model.dims.n_mels)
    example = (feats, state.frontend.conv1, state.frontend.conv2, *_stacked(state))
    batch, frames = torch.export.Dim("batch", min=1, max=_MAX_DIM), torch.export.Dim("frames", min=1, max=_MAX_DIM)
    dynamic = ({0: batch, 1: SUBSAMPLING * frames}, *({_BATCH_AXIS[name]: batch} for name in STATE_NAMES))
    with torch.no_grad():
        program = torch.onnx.export(
            _FlatStep(model).eval(),
            example,
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic,
            verbose=False,
        )
    stored = replace(config, cmvn=model.cmvn, int8_weights=())  # the graph holds float32 weights and its CMVN
    program.model.metadata_props[METADATA_KEY] = json.dumps(stored.to_json())
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")  # renamed over `path` once whole: a killed export leaves none
    try:
        program.save(str(partial), external_data=False)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _stacked(state: EncoderState) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s.conv for s in state.layers]), torch.stack([s.ssm for s in state.layers])


def _stored_config(session: ort.InferenceSession, path: Path) -> ModelConfig:
    """The `ModelConfig` in an exported file's metadata; ModelLoadError if it is missing or malformed."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ModelLoadError(f"{path}: no '{METADATA_KEY}' metadata (not written by `asr export`)")
    try:
        stored = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: its '{METADATA_KEY}' metadata is not valid JSON: {e}") from e
    if not isinstance(stored, dict):
        raise ModelLoadError(f"{path}: its '{METADATA_KEY}' metadata is not a JSON object")
    return parse_config(stored, path)


class OnnxModel:
    """An exported file run by onnxruntime, with `ASRModel`'s streaming interface (`dims`, `init_state`, `chunk`,
    `pad_features`), so `StreamRecognizer` and `transcribe_file` take it in place of the model.

    `providers`: onnxruntime's execution providers, in order of preference (default: the CPU's)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"ONNX model not found: {path}")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as e:
            raise ModelLoadError(f"{path}: not a loadable ONNX model: {e}") from e
        self.config = _stored_config(self.session, path)
        self.dims: ModelDimensions = self.config.dims
        self.cmvn_mean = self.config.cmvn.mean.float()
        self._check_inputs(path)

    def _check_inputs(self, path: Path) -> None:
        """The graph's inputs are `INPUT_NAMES`, and each state input's shape is `init_state`'s but for the batch."""
        inputs = self.session.get_inputs()
        if tuple(i.name for i in inputs) != INPUT_NAMES:
            raise ModelLoadError(f"{path}: inputs {[i.name for i in inputs]}, expected {list(INPUT_NAMES)}")
        expected = self.init_state(1).feeds()
        for graph_input in inputs[1:]:
            want: list[int | None] = list(expected[graph_input.name].shape)
            want[_BATCH_AXIS[graph_input.name]] = None  # the graph's dynamic batch
            got = [n if isinstance(n, int) else None for n in graph_input.shape]
            if got != want:
                raise ModelLoadError(f"{path}: input {graph_input.name} is {got}, the metadata's dims give {want}")

    def init_state(self, batch: int, device: torch.device | str | None = None) -> OnnxState:
        """Zeroed state for `batch` streams (`device` is accepted for `ASRModel`'s signature; arrays are on the
        host)."""
        shapes = state_shapes(self.dims, batch)
        return OnnxState(**{name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()})

    def pad_features(self, feats: torch.Tensor) -> torch.Tensor:
        """As `ASRModel.pad_features`: feats (B, T, n_mels) -> (B, ceil(T / 4) * 4, n_mels), padded with the mean."""
        return pad_with_mean(feats, self.cmvn_mean)

    def chunk(self, feats: torch.Tensor, state: OnnxState) -> tuple[torch.Tensor, OnnxState]:
        """feats (B, 4 L, n_mels) raw log-mel -> logits (B, L, V) float32 (CPU); `state`'s arrays are replaced by
        the next state's (onnxruntime's fresh outputs: no copy)."""
        if feats.shape[1] % SUBSAMPLING:
            raise ValueError(f"chunk() needs a multiple of {SUBSAMPLING} feature frames, got {feats.shape[1]}")
        if feats.shape[0] != state.conv1.shape[0]:
            raise ValueError(f"feats hold {feats.shape[0]} streams, the state {state.conv1.shape[0]}")
        if feats.shape[1] == 0:
            return torch.zeros(feats.shape[0], 0, self.dims.vocab_size), state
        out = self.session.run(None, {"feats": feats.detach().float().cpu().numpy(), **state.feeds()})
        for name, value in zip(STATE_NAMES, out[1:], strict=True):
            setattr(state, name, value)
        return torch.from_numpy(out[0]), state


def stream_difference(model: ASRModel, exported: OnnxModel, chunks: tuple[int, ...], frames: int = 48) -> float:
    """Largest |logit difference| between `model`'s offline forward over random log-mel of 2 streams (`frames`
    encoder frames) and `exported` fed the same features in chunks of `chunks` encoder frames, in turn."""
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(2, SUBSAMPLING * frames, model.dims.n_mels, generator=generator) * 2 + model.cmvn_mean
    with torch.inference_mode():
        offline = model(feats).float()
    state, start, pieces = exported.init_state(2), 0, []
    while start < feats.shape[1]:
        size = SUBSAMPLING * chunks[len(pieces) % len(chunks)]
        logits, state = exported.chunk(feats[:, start : start + size], state)
        pieces.append(logits)
        start += size
    return (torch.cat(pieces, 1) - offline).abs().max().item()
