"""Model directories: `model.safetensors` (weights) plus `config.json` (everything else).

config.json carries the format version, the `ModelDimensions`, the feature settings, the CMVN
statistics and the vocabulary. Nothing is ever unpickled.

Weights are stored as float32, float16 or, for the large matrices, int8 with one float32 scale per output
row (`NAME` int8 plus `NAME.int8_scale`; config.json lists them under `int8_weights`). They are always
loaded as float32, so the rest of the code never sees the storage format.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from asr.features import CMVN, FeatureSettings
from asr.model import ASRModel, ModelDimensions
from asr.text import VOCAB, Tokenizer

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INT8_SCALE_SUFFIX = ".int8_scale"
INT8_MIN_ELEMENTS = 4096  # smaller tensors (norms, biases, SSM parameters, conv taps) keep their dtype


class ModelLoadError(Exception):
    """A model directory that cannot be used, with a message that says why."""


@dataclass(frozen=True)
class ModelConfig:
    dims: ModelDimensions
    cmvn: CMVN
    vocab: tuple[str, ...] = VOCAB
    features: FeatureSettings = field(default_factory=FeatureSettings)
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance (data, steps, ...)
    int8_weights: tuple[str, ...] = ()  # tensors stored as int8 with per-row scales

    def to_json(self) -> dict[str, Any]:
        raw = {
            "format_version": FORMAT_VERSION,
            "dims": self.dims.to_dict(),
            "features": asdict(self.features),
            "cmvn": self.cmvn.to_dict(),
            "vocab": list(self.vocab),
            "info": self.info,
        }
        return raw | ({"int8_weights": list(self.int8_weights)} if self.int8_weights else {})


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only still there if writing failed


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row: weight (R, ...) -> (int8 (R, ...), float32 scale (R,))."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight of `quantize_int8`'s (int8 (R, ...), scale (R,))."""
    return q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))


def _storable(model: ASRModel, dtype: torch.dtype | None, int8: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to write, and the names stored as int8."""
    tensors: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if int8 and t.dim() >= 2 and t.numel() >= INT8_MIN_ELEMENTS:
            tensors[name], tensors[name + INT8_SCALE_SUFFIX] = quantize_int8(t)
            quantized.append(name)
        else:
            tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    return tensors, quantized


def save_model(
    model: ASRModel,
    directory: str | Path,
    info: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    int8: bool = False,
) -> Path:
    """Save weights and config. `dtype` casts the weights (float16 halves the size); `int8` stores every
    matrix of at least `INT8_MIN_ELEMENTS` weights as int8 with per-row scales (a quarter of float32)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, quantized = _storable(model, dtype, int8)
    config = ModelConfig(dims=model.dims, cmvn=model.cmvn, info=info or {}, int8_weights=tuple(quantized))
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_json(), indent=2) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def parse_config(raw: dict[str, Any], where: Path) -> ModelConfig:
    """A `ModelConfig` from config.json's object (`ModelConfig.to_json`); ModelLoadError names `where`."""
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{where}: format_version {version!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    missing = [k for k in ("dims", "features", "cmvn", "vocab") if k not in raw]
    if missing:
        raise ModelLoadError(f"{where}: missing keys {missing}")
    known = {f.name for f in fields(ModelDimensions)}
    unknown = sorted(set(raw["dims"]) - known)
    if unknown:
        raise ModelLoadError(f"{where}: unknown model dimensions {unknown}")
    try:
        dims = ModelDimensions(**raw["dims"])
        features = FeatureSettings(**raw["features"])
        cmvn = CMVN.from_dict(raw["cmvn"])
        vocab = tuple(Tokenizer(raw["vocab"]).vocab)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{where}: invalid config: {e}") from e
    if features != FeatureSettings():
        raise ModelLoadError(f"{where}: trained with features {features}, but this build computes {FeatureSettings()}")
    if len(vocab) != dims.vocab_size:
        raise ModelLoadError(f"{where}: vocabulary has {len(vocab)} entries but dims.vocab_size is {dims.vocab_size}")
    int8_weights = raw.get("int8_weights", [])
    if not isinstance(int8_weights, list) or not all(isinstance(n, str) for n in int8_weights):
        raise ModelLoadError(f"{where}: int8_weights must be a list of tensor names")
    return ModelConfig(
        dims=dims, cmvn=cmvn, vocab=vocab, features=features, info=raw.get("info", {}), int8_weights=tuple(int8_weights)
    )


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a model directory holds {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return parse_config(raw, path)


def _check_shapes(model: ASRModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
    problems += [
        f"{k}: checkpoint {found[k]} vs model {expected[k]}"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ModelLoadError(f"{where}: weights do not match config.json: {shown}")


def _dequantized(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: Path) -> dict[str, torch.Tensor]:
    """`tensors` with each int8 weight in `names` and its scale replaced by the float32 weight."""
    out = dict(tensors)
    for name in names:
        q, scale = out.pop(name, None), out.pop(name + INT8_SCALE_SUFFIX, None)
        if q is None or scale is None:
            raise ModelLoadError(f"{where}: int8 weight {name} or its scale {name}{INT8_SCALE_SUFFIX} is missing")
        if q.dtype != torch.int8 or q.dim() < 2 or tuple(scale.shape) != (q.shape[0],):
            raise ModelLoadError(
                f"{where}: {name} must be an int8 matrix with one scale per row, "
                f"got {q.dtype} {tuple(q.shape)} and scale {tuple(scale.shape)}"
            )
        out[name] = dequantize_int8(q, scale)
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what `--dtype` loads a model as, by name


def load_model(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ASRModel, ModelConfig]:
    """Load a model directory, in eval mode, on `device`. Raises ModelLoadError with the reason."""
    config = load_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file: {e}") from e
    tensors = _dequantized(tensors, config.int8_weights, path)
    model = ASRModel(config.dims, config.cmvn)
    _check_shapes(model, tensors, path)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device=device, dtype=dtype).eval(), config
