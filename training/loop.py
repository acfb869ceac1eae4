"""The training loop: read it top to bottom in `train()`.

One process per device. Under torchrun (WORLD_SIZE > 1) it runs DDP: every rank builds the
same epoch plan and takes every WORLD_SIZE-th batch; rank 0 logs, evaluates and saves. One data
loader serves the whole run (its worker processes stay up across epochs); the position saved in a
checkpoint is (epoch, batch), and a resumed run continues from exactly there.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
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
from asr.checkpoint import load_model
from asr.data import DataError, DataSource, SpeechDataset, Utterance, bucket_batches, collate, mix, read_source
from asr.evaluate import evaluate
from asr.features import CMVN, SAMPLE_RATE, BatchLogMel, CMVNAccumulator, LogMel, frame_lengths
from asr.model import ASRModel
from asr.text import Tokenizer, ctc_min_frames
from training.config import DataConfig, OptimConfig, SourceConfig, TrainConfig
from training.device_augment import augment_batch
from training.grow import grown_state_dict
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
    dropped: tuple[int, ...]  # per training source: utterances too fast for CTC

    def summary(self) -> dict:
        """What the run trains on; written to RUN/data.json and printed at the start."""
        sources = [
            {
                "source": s.name,
                "utterances": len(s.utterances),
                "hours": round(s.hours, 3),
                "weight": w,
                "dropped_too_fast": d,
                "skipped_unreadable": len(s.skipped),
            }
            for s, w, d in zip(self.train, self.weights, self.dropped, strict=True)
        ]
        dev_hours = sum(u.duration for u in self.dev) / 3600
        return {"train": sources, "dev": {"utterances": len(self.dev), "hours": round(dev_hours, 3)}}


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
    if src.exclude_speakers or src.only_speakers or src.exclude_ids:
        drop, keep = set(src.exclude_speakers), set(src.only_speakers)
        pattern = re.compile(src.exclude_ids) if src.exclude_ids else None
        utts = tuple(
            u
            for u in source.utterances
            if u.speaker not in drop and (not keep or u.speaker in keep) and not (pattern and pattern.fullmatch(u.id))
        )
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
    train, dropped = [], []
    for src in cfg.train:
        source = _read(src)
        kept = tuple(u for u in source.utterances if fits_ctc(u, cfg.max_ctc_density))
        if not kept:
            raise DataError(f"{src.path}: every utterance is too fast for CTC at 40 ms frames")
        train.append(DataSource(source.name, kept, source.skipped))
        dropped.append(len(source.utterances) - len(kept))
    dev = tuple(u for s in cfg.dev for u in _read(s).utterances)
    return TrainData(tuple(train), tuple(s.weight for s in cfg.train), dev[: cfg.dev_limit], tuple(dropped))


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
    """The loader workers' augmentations; without reverb and noise when `batch_features` does those on the device."""
    a = cfg.augment
    reverb, noise = (0.0, 0.0) if a.on_device else (a.reverb, a.noise)
    config = AugmentConfig(
        speed=a.speed, noise=noise, reverb=reverb, telephone=a.telephone, codec=a.codec, babble_share=a.babble_share
    )

    def babble_source(rng: np.random.Generator) -> list[torch.Tensor]:
        return [load(utts[int(i)].audio) for i in rng.integers(len(utts), size=int(rng.integers(3, 7)))]

    return Augmenter(config, babble_source)


# ---------------------------------------------------------------- steps


@torch.no_grad()
def compute_cmvn(data: TrainData, cfg: TrainConfig, logmel: LogMel | BatchLogMel, device: torch.device, load) -> CMVN:
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
    """logits (B, L, V); out_lengths (B,) on the CPU, as the batch's target lengths stay: the CUDA loss reads
    lengths on the host, and lengths on the device would cost a copy back."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (L, B, V), float32 whatever the autocast
    return F.ctc_loss(
        log_probs,
        batch.targets.to(logits.device, non_blocking=True),
        out_lengths,
        batch.target_lengths,
        blank=0,
        reduction="mean",
        zero_infinity=True,
    )


@torch.no_grad()
def batch_features(
    batch,
    logmel: LogMel | BatchLogMel,
    cmvn_mean: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverb and noise on the device if `data.augment.on_device`, log-mel, then SpecAugment: feats (B, T, n_mels),
    valid frames (B,) on the CPU.

    No step of training waits for the device until the CTC loss reads its lengths (copies are non-blocking
    from the loader's pinned memory), so the host queues a step's work while the device runs the last one's."""
    audio = batch.audio.to(device, non_blocking=True)
    a = cfg.data.augment
    if a.on_device:
        samples = batch.audio_lengths.to(device, non_blocking=True)
        audio = augment_batch(audio, samples, a.reverb, a.noise, a.babble_share, generator)
    feats = logmel(audio)
    lengths = frame_lengths(batch.audio_lengths)
    masked = spec_augment(feats, lengths.to(device, non_blocking=True), cfg.spec_augment, generator, cmvn_mean)
    return masked, lengths


def forward_backward(
    model: torch.nn.Module, feats: torch.Tensor, lengths: torch.Tensor, batch, cfg: TrainConfig
) -> tuple[torch.Tensor, int]:
    """bf16-autocast forward, float32 CTC loss, backward. lengths (B,) on the CPU. Returns (loss, encoder frames)."""
    with torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16"):
        logits = model(feats)
    out_lengths = ASRModel.output_lengths(lengths)
    loss = ctc_loss(logits, out_lengths, batch)
    loss.backward()
    return loss.detach(), int(out_lengths.sum())


# ---------------------------------------------------------------- the run


def _worker_init(nice: int, _: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process, which stops the run cleanly, and run `nice`
    steps below it, so that the main process, which feeds the device, gets a core when it needs one."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(nice)


def worker_init(cfg: DataConfig) -> Callable[[int], None]:
    """The loader's `worker_init_fn` for this data config."""
    return functools.partial(_worker_init, cfg.worker_nice)


class _Stop:
    """While active, SIGTERM/SIGINT ask the loop to save a checkpoint and stop at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> _Stop:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.requested = True


class EpochDataset(torch.utils.data.Dataset):
    """Utterances addressed by (epoch, index into that epoch's `epoch_plan`), so that one loader can run through
    many epochs: item (e, i) is item i of a `SpeechDataset` over epoch e's utterances at epoch e (the same audio,
    augmentation and tokens as before)."""

    def __init__(self, data: TrainData, cfg: TrainConfig, augment, load) -> None:
        self.data, self.cfg, self.augment, self.load = data, cfg, augment, load
        self._epochs: dict[int, SpeechDataset] = {}  # the last two epochs this process read

    def __getitem__(self, key: tuple[int, int]) -> tuple[str, torch.Tensor, list[int]] | None:
        epoch, index = key
        if epoch not in self._epochs:
            utts, _ = epoch_plan(self.data, self.cfg, epoch)
            dataset = SpeechDataset(utts, Tokenizer(), self.augment, seed=self.cfg.run.seed, load=self.load)
            dataset.epoch = epoch
            self._epochs = {e: d for e, d in self._epochs.items() if e == epoch - 1} | {epoch: dataset}
        return self._epochs[epoch][index]


class _Keys:
    """The loader's batch sampler: `Trainer._plan`'s batches as lists of EpochDataset keys."""

    def __init__(self, trainer: Trainer, start: tuple[int, int]) -> None:
        self.trainer, self.start = trainer, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, _, indices in self.trainer._plan(*self.start):
            yield [(epoch, i) for i in indices]


class Trainer:
    """One training run. `run()` is the loop; each other method is one part of a step."""

    def __init__(self, cfg: TrainConfig, resume: Path | None, progress: bool, init_from: Path | None = None) -> None:
        self.cfg, self.d = cfg, setup_distributed()
        self.data = prepare_data(cfg.data)
        self.device = pick_device(cfg.run.device, self.d)
        self.run_dir = Path(cfg.run.out_dir)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.model = ASRModel(cfg.model).to(self.device)
        if cfg.run.compile:
            self.model.compile_blocks()
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.optim))
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.run.seed + self.d.rank)
        self.logmel = BatchLogMel().to(self.device)
        self.all_train = [u for s in self.data.train for u in s.utterances]
        show = progress and self.d.main
        self.load = AudioCache(self.all_train, os.cpu_count() or 1, show) if cfg.data.cache_audio else load_audio
        self.augment = make_augmenter(cfg.data, self.all_train, self.load)
        self.state, self.last_ckpt = self._restore(resume, init_from), self.run_dir
        self.net: torch.nn.Module = self.model
        if self.d.world > 1:
            ids = [self.d.local_rank] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.logger = MetricsLogger(self.run_dir) if self.d.main else None
        self.bar = tqdm(total=cfg.optim.max_steps, initial=self.state.step, desc="train", disable=not show)
        self.flops_per_audio_s = 3 * forward_flops_per_second_of_audio(cfg.model)
        self.window_audio, self.window_start, self.start = 0.0, time.perf_counter(), time.perf_counter()

    def _restore(self, resume: Path | None, init_from: Path | None) -> TrainerState:
        """The newest checkpoint under `resume`; if there is none (or no `resume`), a fresh start from
        `init_from`'s weights and CMVN, or from random weights with CMVN from the data."""
        ckpt = latest_checkpoint(resume) if resume is not None else None
        if resume is not None and ckpt is None and init_from is None:
            raise DataError(f"--resume {resume}: no complete checkpoint there")
        if ckpt is None and init_from is not None:
            self._init_weights(init_from)
            return TrainerState()
        if ckpt is None:
            self.model.set_cmvn(compute_cmvn(self.data, self.cfg, self.logmel, self.device, self.load))
            return TrainerState()
        self.last_ckpt = ckpt
        return load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.generator)

    def _init_weights(self, model_dir: Path) -> None:
        """Start from a model directory's weights and CMVN (fine-tuning). Its dims must be the config's,
        except that the config may ask for more layers (`training.grow`: new blocks start as the identity)."""
        source, config = load_model(model_dir)
        try:
            weights = grown_state_dict(source, self.cfg.model)
        except ValueError as e:
            raise DataError(
                f"--init-from {model_dir}: its dims {config.dims} differ from the config's {self.cfg.model} "
                f"(only a larger n_layers may differ: {e})"
            ) from e
        self.model.load_state_dict(weights)
        self.model.set_cmvn(config.cmvn)
        if config.dims.n_layers < self.cfg.model.n_layers:
            tqdm.write(f"grew {model_dir} from {config.dims.n_layers} to {self.cfg.model.n_layers} layers")

    def run(self, until_step: int | None) -> TrainResult:
        if self.d.main:
            summary = json.dumps(self.data.summary(), indent=2)
            (self.run_dir / "data.json").write_text(summary + "\n")
            tqdm.write(f"training data: {summary}")
        last_step = min(self.cfg.optim.max_steps, until_step or self.cfg.optim.max_steps)
        start = (self.state.epoch, self.state.batch)
        with _Stop() as stop:
            if self.state.step < last_step:
                for (epoch, index, _), batch in zip(self._plan(*start), self._loader(start), strict=False):
                    self.state.epoch, self.state.batch = epoch, index
                    self._step(batch)
                    done = self.state.step >= last_step or stop.requested
                    self._report(save=done)
                    if done:
                        break
        self._close()
        return TrainResult(self.state.step, self.state.best_wer, self.last_ckpt, self.run_dir)

    def _plan(self, epoch: int, batch: int) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, batch index, utterance indices) of this rank's batches from (epoch, batch) on, epoch after
        epoch (each rank takes every WORLD_SIZE-th batch of the epoch, the same number on every rank)."""
        for e in itertools.count(epoch):
            _, batches = epoch_plan(self.data, self.cfg, e)
            mine = batches[self.d.rank :: self.d.world][: len(batches) // self.d.world]
            if not mine:
                raise DataError(f"epoch {e} has {len(batches)} batches: too few for {self.d.world} rank(s)")
            for j in range(batch if e == epoch else 0, len(mine)):
                yield e, j, mine[j]

    def _loader(self, start: tuple[int, int]) -> torch.utils.data.DataLoader:
        """This rank's batches from `start` (epoch, batch) on, through one loader for the whole run: its worker
        processes stay up and keep loading across epoch boundaries."""
        dataset = EpochDataset(self.data, self.cfg, self.augment, self.load)
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_Keys(self, start),
            collate_fn=collate,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init(self.cfg.data),
        )

    def _step(self, batch) -> None:
        self.model.train()
        feats, lengths = batch_features(batch, self.logmel, self.model.cmvn_mean, self.cfg, self.device, self.generator)
        self.loss, _ = forward_backward(self.net, feats, lengths, batch, self.cfg)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batch += 1
        self.window_audio += float(batch.audio_lengths.sum()) / SAMPLE_RATE * self.d.world
        self.bar.update(1)

    def _report(self, save: bool) -> None:
        """Rank 0: dev WER, metrics and checkpoints when their intervals come round."""
        if not self.d.main:
            return
        run, step = self.cfg.run, self.state.step
        dev_wer = (
            _dev_wer(self.model, self.data.dev, self.device) if step % run.eval_every == 0 and self.data.dev else None
        )
        if step % run.log_every == 0 or dev_wer is not None:
            self._log(dev_wer)
        if save or step % run.save_every == 0 or dev_wer is not None:
            self.last_ckpt = _save(
                self.run_dir, self.cfg, self.model, self.optimizer, self.scheduler, self.state, self.generator, dev_wer
            )

    def _log(self, dev_wer: float | None) -> None:
        now = time.perf_counter()
        rate = self.window_audio / (now - self.window_start)
        peak = self.cfg.run.peak_tflops * 1e12
        mfu = rate * self.flops_per_audio_s / peak if self.device.type == "cuda" else 0.0
        lr = self.scheduler.get_last_lr()[0]
        row = Row(
            self.state.step,
            self.state.epoch,
            float(self.loss),
            lr,
            float(self.grad_norm),
            rate,
            mfu,
            dev_wer,
            now - self.start,
        )
        self.logger.log(row)
        self.bar.set_postfix(loss=f"{row.loss:.3f}", lr=f"{lr:.2e}", audio_s_per_s=f"{rate:.0f}")
        self.window_audio, self.window_start = 0.0, now

    def _close(self) -> None:
        self.bar.close()
        if self.logger is not None:
            self.logger.close()
        if self.d.world > 1:
            dist.barrier()
            dist.destroy_process_group()


def train(
    cfg: TrainConfig,
    resume: Path | None = None,
    progress: bool = True,
    until_step: int | None = None,
    init_from: Path | None = None,
) -> TrainResult:
    """Train per `cfg`, from scratch, from a model directory's weights (`init_from`, a new schedule and
    optimizer), or continuing exactly from the newest checkpoint under `resume` (which takes precedence).

    `until_step` stops early, with a checkpoint, without changing the schedule (which still runs
    to optim.max_steps): a long run can be cut into pieces that each fit a time limit.
    """
    return Trainer(cfg, resume, progress, init_from).run(until_step)


def _dev_wer(model: ASRModel, dev: Sequence[Utterance], device: torch.device) -> float:
    """Greedy WER on the dev set, eager even where the blocks are compiled (float32 inference would compile
    graphs of its own on rank 0 alone)."""
    model.eval()
    with torch.compiler.set_stance("force_eager"):
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
