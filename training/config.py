"""Training configuration: a TOML file mapped onto typed dataclasses, checked strictly.

An unknown key or a value of the wrong type or range is an error that names the key
(`optim.lr: must be > 0, got -1`). See `configs/default.toml` for every key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asr.model import ModelDimensions


class ConfigError(Exception):
    """A bad training config; the message names the key."""


@dataclass(frozen=True)
class SourceConfig:
    path: str
    weight: float = 1.0
    exclude_speakers: tuple[str, ...] = ()  # e.g. the speakers kept aside for dev
    only_speakers: tuple[str, ...] = ()  # e.g. those same speakers, as a dev source
    exclude_ids: str = ""  # a regular expression; utterances whose id fully matches it are left out

    def __post_init__(self) -> None:
        try:
            re.compile(self.exclude_ids)
        except re.error as e:
            raise ValueError(f"exclude_ids: not a valid regular expression: {e}") from e


@dataclass(frozen=True)
class AugmentSection:
    speed: float = 0.5
    noise: float = 0.4
    reverb: float = 0.2
    telephone: float = 0.05
    codec: float = 0.05
    babble_share: float = 0.3
    on_device: bool = False  # reverb and noise per batch on the training device (training.device_augment)


@dataclass(frozen=True)
class DataConfig:
    train: tuple[SourceConfig, ...]
    dev: tuple[SourceConfig, ...] = ()
    max_batch_seconds: float = 600.0
    num_workers: int = 4
    worker_nice: int = 10  # loader workers run this many nice steps below the main process (0-19)
    cache_audio: bool = False  # decode all training audio into RAM (int16) once
    dev_limit: int = 400  # dev utterances decoded at each evaluation
    max_ctc_density: float = 0.9  # drop training utterances needing more of their output frames than this
    augment: AugmentSection = field(default_factory=AugmentSection)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    warmup_steps: int = 500
    max_steps: int = 10_000
    schedule: str = "cosine"  # cosine | noam
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0


@dataclass(frozen=True)
class SpecAugmentConfig:
    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 4
    time_width: float = 0.05  # of the utterance's frames, per mask


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    cmvn_batches: int = 50
    log_every: int = 20
    eval_every: int = 500
    save_every: int = 500
    keep_last: int = 3
    peak_tflops: float = 989.0  # for MFU: the GPU's dense bf16 rate (H200 datasheet)
    compile: bool = False  # torch.compile the Mamba blocks for training (ASRModel.compile_blocks; CUDA)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    model: ModelDimensions = field(default_factory=ModelDimensions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Range checks: key -> (test, what the value must be).
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.max_steps": (lambda v: v > 0, "> 0"),
    "optim.schedule": (lambda v: v in ("cosine", "noam"), "one of cosine, noam"),
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "optim.grad_clip": (lambda v: v > 0, "> 0"),
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "run.precision": (lambda v: v in ("bf16", "fp32"), "one of bf16, fp32"),
    "run.device": (lambda v: v in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    "run.log_every": (lambda v: v > 0, "> 0"),
    "run.eval_every": (lambda v: v > 0, "> 0"),
    "run.save_every": (lambda v: v > 0, "> 0"),
    "run.keep_last": (lambda v: v > 0, "> 0"),
    "run.cmvn_batches": (lambda v: v > 0, "> 0"),
    "data.max_batch_seconds": (lambda v: v > 0, "> 0"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.worker_nice": (lambda v: 0 <= v <= 19, "between 0 and 19"),
    "data.dev_limit": (lambda v: v > 0, "> 0"),
    "data.max_ctc_density": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.train": (lambda v: len(v) > 0, "at least one source"),
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{key}: expected {len(item_types)} items, got {len(value)}")
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required")
            continue
        value = _convert(raw[f.name], hints[f.name], key)
        if key in _CHECKS and not _CHECKS[key][0](value):
            raise ConfigError(f"{key}: must be {_CHECKS[key][1]}, got {value!r}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # ModelDimensions' own checks
        raise ConfigError(f"{prefix}: {e}") from e


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, raw, "")


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return parse_config(raw)
