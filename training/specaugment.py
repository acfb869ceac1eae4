"""SpecAugment on the GPU: frequency and time masks over a padded batch of log-mel features."""

from __future__ import annotations

import torch

from training.config import SpecAugmentConfig


def spec_augment(
    feats: torch.Tensor,
    lengths: torch.Tensor,
    cfg: SpecAugmentConfig,
    generator: torch.Generator,
    fill: torch.Tensor,
) -> torch.Tensor:
    """feats (B, T, F) raw log-mel; lengths (B,) valid frames; fill (F,) the value a masked bin
    takes (the CMVN mean, so a masked bin is zero after normalisation). Returns a new tensor.

    Each utterance gets `freq_masks` bands of up to `freq_width` bins and `time_masks` spans of
    up to `time_width` x its length, drawn from `generator` (saved with checkpoints).
    """
    b, t, f = feats.shape
    device = feats.device
    mask = torch.zeros(b, t, f, dtype=torch.bool, device=device)
    bins = torch.arange(f, device=device)
    frames = torch.arange(t, device=device)
    for _ in range(cfg.freq_masks):
        width = torch.randint(0, cfg.freq_width + 1, (b, 1), generator=generator, device=device)
        start = (torch.rand(b, 1, generator=generator, device=device) * (f - width)).long()
        mask |= ((bins >= start) & (bins < start + width))[:, None, :]
    max_width = (lengths.to(device).float() * cfg.time_width).long().clamp_min(0)[:, None]
    for _ in range(cfg.time_masks):
        width = (torch.rand(b, 1, generator=generator, device=device) * (max_width + 1)).long()
        start = (torch.rand(b, 1, generator=generator, device=device) * (lengths.to(device)[:, None] - width)).long()
        mask |= ((frames >= start) & (frames < start + width))[:, :, None]
    return torch.where(mask, fill.to(feats.dtype), feats)
