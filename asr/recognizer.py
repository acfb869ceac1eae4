"""One stream through the streaming path: 16 kHz audio in any chunking -> CTC log-probabilities.

Features, subsampling and every Mamba layer carry their own state, so any split of the audio
gives the log-probabilities of one offline pass (`offline_log_probs`) within float tolerance.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from asr.features import N_MELS, SUBSAMPLING, LogMel, StreamingLogMel, num_frames
from asr.model import ASRModel, ModelDimensions


class StreamingModel(Protocol):
    """What a stream needs of a model: `ASRModel`, or an exported graph (`export.onnx.OnnxModel`)."""

    dims: ModelDimensions

    def init_state(self, batch: int, device: torch.device | str | None = None) -> Any: ...

    def chunk(self, feats: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...

    def pad_features(self, feats: torch.Tensor) -> torch.Tensor: ...


class StreamRecognizer:
    """Holds one stream's feature leftovers, pending feature frames and encoder state."""

    def __init__(self, model: StreamingModel, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self.features = StreamingLogMel(device=self.device)
        with torch.inference_mode():
            self.state = model.init_state(1, self.device)
        self.pending = torch.zeros(0, N_MELS, device=self.device)  # < SUBSAMPLING frames

    @torch.inference_mode()
    def _run(self, feats: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model.chunk(feats.unsqueeze(0), self.state)
        return logits[0].float().log_softmax(-1)

    def accept(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (N,) 16 kHz float32 -> log-probs (L, V) for the encoder frames now complete."""
        feats = torch.cat([self.pending, self.features.accept(audio)])
        usable = feats.shape[0] - feats.shape[0] % SUBSAMPLING
        self.pending = feats[usable:]
        return self._run(feats[:usable])

    def finish(self) -> torch.Tensor:
        """End of stream: the last partial group of feature frames, padded as `forward` pads it."""
        if self.pending.shape[0] == 0:
            return torch.zeros(0, self.model.dims.vocab_size, device=self.device)
        tail = self.model.pad_features(self.pending.unsqueeze(0))[0]
        self.pending = self.pending[:0]
        return self._run(tail)


@torch.inference_mode()
def batch_log_probs(
    model: ASRModel, audios: list[torch.Tensor], device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Whole utterances in one padded batch: audio (N_i,) 16 kHz each -> log-probs (L_i, V) each.

    Feature frames past each utterance's end are set to the CMVN mean, as streaming pads them,
    so every row's last frame matches the streaming path too.
    """
    lengths = [a.numel() for a in audios]
    padded = torch.zeros(len(audios), max(lengths), device=device)
    for i, a in enumerate(audios):
        padded[i, : a.numel()] = a.to(device)
    feats = LogMel().to(device)(padded)
    frames = [num_frames(n) for n in lengths]
    for i, n in enumerate(frames):
        feats[i, n:] = model.cmvn_mean.to(feats.dtype)
    log_probs = model(feats).float().log_softmax(-1)
    return [log_probs[i, : -(-n // SUBSAMPLING)] for i, n in enumerate(frames)]


def offline_log_probs(model: ASRModel, audio: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Whole-utterance pass: audio (N,) 16 kHz -> log-probs (L, V)."""
    return batch_log_probs(model, [audio], device)[0]
