"""Model directories: `model.safetensors` (weights) plus `config.json` (everything else).

config.json carries the format version, the `ModelDimensions`, the feature settings, the CMVN
statistics and the vocabulary. Nothing is ever unpickled.
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


class ModelLoadError(Exception):
    """A model directory that cannot be used, with a message that says why."""


@dataclass(frozen=True)
class ModelConfig:
    dims: ModelDimensions
    cmvn: CMVN
    vocab: tuple[str, ...] = VOCAB
    features: FeatureSettings = field(default_factory=FeatureSettings)
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance (data, steps, ...)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dims": self.dims.to_dict(),
            "features": asdict(self.features),
            "cmvn": self.cmvn.to_dict(),
            "vocab": list(self.vocab),
            "info": self.info,
        }


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only still there if writing failed


def save_model(
    model: ASRModel, directory: str | Path, info: dict[str, Any] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Save weights (optionally cast to `dtype`, e.g. float16 to halve the size) and config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None else t.detach()).cpu().contiguous()
        for name, t in model.state_dict().items()
    }
    config = ModelConfig(dims=model.dims, cmvn=model.cmvn, info=info or {})
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_json(), indent=2) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def _parse_config(raw: dict[str, Any], where: Path) -> ModelConfig:
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
    return ModelConfig(dims=dims, cmvn=cmvn, vocab=vocab, features=features, info=raw.get("info", {}))


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
    return _parse_config(raw, path)


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
    model = ASRModel(config.dims, config.cmvn)
    _check_shapes(model, tensors, path)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device=device, dtype=dtype).eval(), config
