"""Training checkpoints: atomic, resumable exactly, and free of pickle.

A checkpoint is a folder `RUN/ckpt-<step>/` holding
- `model.safetensors` + `config.json`: a normal model directory (`asr.checkpoint`), usable as is;
- `optimizer.safetensors`: the optimizer's tensors; `trainer.json`: everything else (step, data
  position, scheduler, hyper-parameters of the param groups, Python RNG, best dev WER);
- `rng.safetensors`: the torch RNG states (CPU, CUDA, SpecAugment generator).
It is written as `.ckpt-<step>.tmp/` and renamed into place, so a run killed at any moment
leaves only whole checkpoints behind; `--resume` takes the newest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from asr.checkpoint import save_model
from asr.model import ASRModel

PREFIX = "ckpt-"
BEST = "best"


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of this epoch already consumed (this rank's share)
    best_wer: float = float("inf")
    best_step: int = -1


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {
        f"state.{idx}.{name}": value.detach().cpu().contiguous()
        for idx, per_param in sd["state"].items()
        for name, value in per_param.items()
    }
    return tensors, sd["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(spec_generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state(), "spec": spec_generator.get_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _to_json(obj: Any) -> Any:
    """random.getstate() is nested tuples; JSON keeps them as lists."""
    if isinstance(obj, tuple | list):
        return [_to_json(o) for o in obj]
    return obj


def _to_tuple(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuple(o) for o in obj)
    return obj


def save_checkpoint(
    run_dir: Path,
    model: ASRModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    spec_generator: torch.Generator,
    keep_last: int,
    info: dict[str, Any],
) -> Path:
    final = run_dir / f"{PREFIX}{state.step:08d}"
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, info=info)
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file(_rng_tensors(spec_generator), str(tmp / "rng.safetensors"))
    trainer = {
        "state": asdict(state),
        "param_groups": groups,
        "scheduler": scheduler.state_dict(),
        "python_random": _to_json(random.getstate()),
    }
    (tmp / "trainer.json").write_text(json.dumps(trainer))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(run_dir, keep_last)
    return final


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / "trainer.json").is_file())


def _prune(run_dir: Path, keep_last: int) -> None:
    for old in _checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def latest_checkpoint(path: Path) -> Path | None:
    """`path` itself if it is a checkpoint, else the newest complete checkpoint inside it."""
    if (path / "trainer.json").is_file():
        return path
    found = _checkpoints(path) if path.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(
    ckpt: Path,
    model: ASRModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    spec_generator: torch.Generator,
) -> TrainerState:
    """Restore everything `save_checkpoint` wrote (the model's CMVN too) and return the state."""
    from asr.checkpoint import load_model

    loaded, _ = load_model(ckpt)
    model.load_state_dict(loaded.state_dict())
    model.set_cmvn(loaded.cmvn)
    trainer = json.loads((ckpt / "trainer.json").read_text())
    _restore_optimizer(optimizer, load_file(str(ckpt / "optimizer.safetensors")), trainer["param_groups"])
    scheduler.load_state_dict(trainer["scheduler"])
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    spec_generator.set_state(rng["spec"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_to_tuple(trainer["python_random"]))
    return TrainerState(**trainer["state"])


def save_best(run_dir: Path, ckpt: Path) -> Path:
    """Copy a checkpoint's model files to RUN/best (through a temporary folder and renames)."""
    tmp, old, best = run_dir / ".best.tmp", run_dir / ".best.old", run_dir / BEST
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy2(ckpt / name, tmp / name)
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best
