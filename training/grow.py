"""Deepen a trained model: insert Mamba blocks that start as the identity, then fine-tune.

`asr train --init-from DIR` with a config that asks for more layers than DIR's model (and is otherwise the
same) builds the deeper model's weights here. Each new block is a copy of the block before it, so its
input projection already reads the residual stream at that depth, with its out_proj zeroed: the block
adds nothing to the residual, and the deeper model computes exactly what the source did until training
moves the zeroed projection (whose gradient is not zero).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from asr.model import ASRModel, ModelDimensions


def layer_sources(old: int, new: int) -> list[tuple[int, bool]]:
    """For each of the `new` blocks, (source block, is a new copy), new blocks spread evenly:
    12 -> 16 puts a copy after every third block."""
    if not 0 < old <= new:
        raise ValueError(f"can only add layers: {old} -> {new}")
    extra = new - old
    after = [-(-(i + 1) * old // extra) - 1 for i in range(extra)]  # ceil((i + 1) old / extra) - 1
    plan: list[tuple[int, bool]] = []
    for block in range(old):
        plan.append((block, False))
        plan += [(block, True)] * after.count(block)
    return plan


def grown_state_dict(source: ASRModel, dims: ModelDimensions) -> dict[str, torch.Tensor]:
    """Weights for a model of `dims` from `source`, whose dims may differ from `dims` only in n_layers."""
    if replace(source.dims, n_layers=dims.n_layers) != dims:
        raise ValueError(f"only n_layers may differ: {source.dims} vs {dims}")
    weights = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("layers.")}
    for index, (block, copy) in enumerate(layer_sources(source.dims.n_layers, dims.n_layers)):
        for name, tensor in source.layers[block].state_dict().items():
            fresh = torch.zeros_like(tensor) if copy and name == "mixer.out_proj.weight" else tensor.clone()
            weights[f"layers.{index}.{name}"] = fresh
    return weights
