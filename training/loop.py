"""The training loop: read it top to bottom in `train()`.

One process per device. Under torchrun (WORLD_SIZE > 1) it runs DDP: every rank builds the
same epoch plan and takes every WORLD_SIZE-th batch; rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from asr.audio import AudioError, load_audio
from asr.augment import AugmentConfig, Augmenter
from asr.data import DataError, DataSource, SpeechDataset, Utterance, bucket_batches, collate, mix, read_source
from asr.evaluate import evaluate
from asr.features import CMVN, SAMPLE_RATE, CMVNAccumulator, LogMel, frame_lengths
from asr.model import ASRModel
from asr.text import Tokenizer, ctc_min_frames
from training.config import DataConfig, OptimConfig, SourceConfig, TrainConfig
from training.metrics import MetricsLogger, Row, forward_flops_per_second_of_audio
from training.specaugment import spec_augment
from training.state import TrainerState, latest_checkpoint, load_checkpoint, save_best, save_checkpoint


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class TrainData:
    train: tuple[DataSource, ...]
    weights: tuple[float, ...]
    dev: tuple[Utterance, ...]


@dataclass(frozen=True)
class TrainResult:
    step: int
    best_wer: float
    last_checkpoint: Path
    run_dir: Path


# ---------------------------------------------------------------- setup


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("run.device = 'cuda' but torch sees no CUDA GPU")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _read(src: SourceConfig) -> DataSource:
    source = read_source(src.path)
    if src.exclude_speakers or src.only_speakers:
        drop, keep = set(src.exclude_speakers), set(src.only_speakers)
        utts = tuple(u for u in source.utterances if u.speaker not in drop and (not keep or u.speaker in keep))
        source = DataSource(source.name, utts, source.skipped)
    if not source.utterances:
        raise DataError(f"{src.path}: no utterances left to use")
    return source


def fits_ctc(utt: Utterance, max_density: float) -> bool:
    """Whether the transcript fits the utterance's encoder frames with room to spare."""
    frames = ASRModel.output_lengths(frame_lengths(torch.tensor(round(utt.duration * SAMPLE_RATE))))
    return ctc_min_frames(utt.text) <= max_density * int(frames)


def prepare_data(cfg: DataConfig) -> TrainData:
    """Read every source; a missing path or an empty source fails here, before any GPU work.
    Training utterances too dense for CTC (see `fits_ctc`) are dropped."""
    train = []
    for src in cfg.train:
        source = _read(src)
        kept = tuple(u for u in source.utterances if fits_ctc(u, cfg.max_ctc_density))
        if not kept:
            raise DataError(f"{src.path}: every utterance is too fast for CTC at 40 ms frames")
        train.append(DataSource(source.name, kept, source.skipped))
    dev = tuple(u for s in cfg.dev for u in _read(s).utterances)
    return TrainData(tuple(train), tuple(s.weight for s in cfg.train), dev[: cfg.dev_limit])


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and conv kernels) only, not on vectors."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio (or Noam's inverse square root)."""
    warm = max(1, cfg.warmup_steps)
    if cfg.schedule == "noam":
        return min((step + 1) / warm, math.sqrt(warm / (step + 1)))
    if step < cfg.warmup_steps:
        return (step + 1) / warm
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- data


class AudioCache:
    """All training audio decoded once into RAM as int16 (2 bytes a sample), in parallel.
    A file that cannot be decoded raises AudioError when asked for, as a file read would."""

    def __init__(self, utts: Sequence[Utterance], workers: int, progress: bool) -> None:
        paths = sorted({u.audio for u in utts})
        with mp.get_context("fork").Pool(max(1, workers)) as pool:
            arrays = pool.imap(_decode_int16, paths, chunksize=16)
            bar = tqdm(arrays, total=len(paths), desc="decoding audio", disable=not progress)
            self.audio = dict(zip(paths, bar, strict=True))

    def __call__(self, path: Path) -> torch.Tensor:
        samples = self.audio[path]
        if isinstance(samples, str):
            raise AudioError(samples)
        return torch.from_numpy(samples.astype(np.float32) / 32768.0)


def _decode_int16(path: Path) -> np.ndarray | str:
    torch.set_num_threads(1)
    try:
        return (load_audio(path).clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    except AudioError as e:
        return str(e)


def epoch_plan(data: TrainData, cfg: TrainConfig, epoch: int) -> tuple[list[Utterance], list[list[int]]]:
    """The utterances of an epoch and its batches (as indices): a pure function of seed and epoch."""
    rng = random.Random(f"{cfg.run.seed}:{epoch}")
    utts = mix(data.train, data.weights, rng)
    index = {id(u): i for i, u in enumerate(utts)}
    batches = bucket_batches(utts, cfg.data.max_batch_seconds, rng)
    return utts, [[index[id(u)] for u in b] for b in batches]


def make_augmenter(cfg: DataConfig, utts: Sequence[Utterance], load) -> Augmenter:
    a = cfg.augment
    config = AugmentConfig(
        speed=a.speed, noise=a.noise, reverb=a.reverb, telephone=a.telephone, codec=a.codec, babble_share=a.babble_share
    )

    def babble_source(rng: np.random.Generator) -> list[torch.Tensor]:
        return [load(utts[int(i)].audio) for i in rng.integers(len(utts), size=int(rng.integers(3, 7)))]

    return Augmenter(config, babble_source)


# ---------------------------------------------------------------- steps


@torch.no_grad()
def compute_cmvn(data: TrainData, cfg: TrainConfig, logmel: LogMel, device: torch.device, load) -> CMVN:
    """Global CMVN from the first `cmvn_batches` batches of epoch 0 (no augmentation)."""
    utts, batches = epoch_plan(data, cfg, 0)
    acc = CMVNAccumulator()
    dataset = SpeechDataset(utts, load=load)
    for indices in batches[: cfg.run.cmvn_batches]:
        batch = collate([dataset[i] for i in indices])
        feats = logmel(batch.audio.to(device))
        lengths = frame_lengths(batch.audio_lengths).tolist()
        acc.update(torch.cat([feats[i, :n] for i, n in enumerate(lengths)]))
    return acc.finalize()


def ctc_loss(logits: torch.Tensor, out_lengths: torch.Tensor, batch) -> torch.Tensor:
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (L, B, V), float32 whatever the autocast
    return F.ctc_loss(
        log_probs,
        batch.targets.to(logits.device),
        out_lengths,
        batch.target_lengths.to(logits.device),
        blank=0,
        reduction="mean",
        zero_infinity=True,
    )


@torch.no_grad()
def batch_features(
    batch, logmel: LogMel, cmvn_mean: torch.Tensor, cfg: TrainConfig, device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel on the device, then SpecAugment: feats (B, T, n_mels), valid frames (B,)."""
    feats = logmel(batch.audio.to(device, non_blocking=True))
    lengths = frame_lengths(batch.audio_lengths).to(device)
    return spec_augment(feats, lengths, cfg.spec_augment, generator, cmvn_mean), lengths


def forward_backward(
    model: torch.nn.Module, feats: torch.Tensor, lengths: torch.Tensor, batch, cfg: TrainConfig
) -> tuple[torch.Tensor, int]:
    """bf16-autocast forward, float32 CTC loss, backward. Returns (loss, encoder frames)."""
    with torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16"):
        logits = model(feats)
    out_lengths = ASRModel.output_lengths(lengths)
    loss = ctc_loss(logits, out_lengths, batch)
    loss.backward()
    return loss.detach(), int(out_lengths.sum())


# ---------------------------------------------------------------- the run


def _worker_init(_: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process, which stops the run cleanly."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Stop:
    """SIGTERM/SIGINT ask the loop to save a checkpoint and stop at the next step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.requested = True


def train(cfg: TrainConfig, resume: Path | None = None, progress: bool = True) -> TrainResult:
    d = setup_distributed()
    data = prepare_data(cfg.data)
    device = pick_device(cfg.run.device, d)
    run_dir = Path(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)

    model = ASRModel(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim))
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed + d.rank)
    logmel = LogMel().to(device)
    all_train = [u for s in data.train for u in s.utterances]
    load = AudioCache(all_train, os.cpu_count() or 1, progress and d.main) if cfg.data.cache_audio else load_audio

    state = TrainerState()
    ckpt = latest_checkpoint(resume) if resume is not None else None
    if resume is not None and ckpt is None:
        raise DataError(f"--resume {resume}: no complete checkpoint there")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, generator)
    else:
        model.set_cmvn(compute_cmvn(data, cfg, logmel, device, load))
    net: torch.nn.Module = model
    if d.world > 1:
        net = DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)

    logger = MetricsLogger(run_dir) if d.main else None
    flops_per_audio_s = 3 * forward_flops_per_second_of_audio(cfg.model)
    stop = _Stop()
    bar = tqdm(total=cfg.optim.max_steps, initial=state.step, desc="train", disable=not (progress and d.main))
    last_ckpt = ckpt or run_dir
    window_audio, window_start, start_time = 0.0, time.perf_counter(), time.perf_counter()
    augment = make_augmenter(cfg.data, all_train, load)

    while state.step < cfg.optim.max_steps and not stop.requested:
        utts, batches = epoch_plan(data, cfg, state.epoch)
        mine = batches[d.rank :: d.world][: len(batches) // d.world]  # equal count on every rank
        dataset = SpeechDataset(utts, Tokenizer(), augment, seed=cfg.run.seed, load=load)
        dataset.epoch = state.epoch
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=mine[state.batch :],
            collate_fn=collate,
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=_worker_init,
        )
        for batch in loader:
            model.train()
            feats, lengths = batch_features(batch, logmel, model.cmvn_mean, cfg, device, generator)
            loss, _ = forward_backward(net, feats, lengths, batch, cfg)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch += 1
            window_audio += float(batch.audio_lengths.sum()) / SAMPLE_RATE * d.world
            bar.update(1)

            dev_wer = None
            if d.main and state.step % cfg.run.eval_every == 0 and data.dev:
                dev_wer = _dev_wer(model, data.dev, device)
            if d.main and (state.step % cfg.run.log_every == 0 or dev_wer is not None):
                elapsed = time.perf_counter() - window_start
                rate = window_audio / elapsed
                mfu = rate * flops_per_audio_s / (cfg.run.peak_tflops * 1e12) if device.type == "cuda" else 0.0
                lr = scheduler.get_last_lr()[0]
                total = time.perf_counter() - start_time
                row = Row(state.step, state.epoch, float(loss), lr, float(grad_norm), rate, mfu, dev_wer, total)
                logger.log(row)
                bar.set_postfix(loss=f"{row.loss:.3f}", lr=f"{lr:.2e}", audio_s_per_s=f"{rate:.0f}")
                window_audio, window_start = 0.0, time.perf_counter()
            save_now = state.step % cfg.run.save_every == 0 or state.step >= cfg.optim.max_steps or stop.requested
            if d.main and (save_now or dev_wer is not None):
                last_ckpt = _save(run_dir, cfg, model, optimizer, scheduler, state, generator, dev_wer)
            if state.step >= cfg.optim.max_steps or stop.requested:
                break
        else:
            state.epoch += 1
            state.batch = 0
    bar.close()
    if logger is not None:
        logger.close()
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(state.step, state.best_wer, last_ckpt, run_dir)


def _dev_wer(model: ASRModel, dev: Sequence[Utterance], device: torch.device) -> float:
    model.eval()
    summary, _ = evaluate(model, dev, "offline", device)
    model.train()
    return summary.wer


def _save(run_dir, cfg, model, optimizer, scheduler, state, generator, dev_wer) -> Path:
    improved = dev_wer is not None and dev_wer < state.best_wer
    if improved:
        state.best_wer, state.best_step = dev_wer, state.step
    info = {"step": state.step, "epoch": state.epoch, "dev_wer": dev_wer, "train_config": cfg.to_dict()}
    ckpt = save_checkpoint(run_dir, model, optimizer, scheduler, state, generator, cfg.run.keep_last, info)
    if improved:
        save_best(run_dir, ckpt)
    return ckpt
