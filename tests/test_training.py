"""Training: config checks, schedule, optimizer groups, SpecAugment, checkpoints, exact resume
(also after SIGKILL), DDP under torchrun, metrics and plots."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asr.cli import main as asr_main
from asr.data import SpeechDataset, collate, read_source
from asr.features import BatchLogMel
from asr.model import ASRModel
from asr.text import Tokenizer
from tests.conftest import TINY
from training.config import ConfigError, OptimConfig, SpecAugmentConfig, load_config, parse_config
from training.loop import batch_features, lr_factor, make_augmenter, make_optimizer, train, worker_init
from training.specaugment import spec_augment
from training.state import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _config(
    tmp_path: Path, corpus: Path, name: str = "run", workers: int = 0, augment_on_device: bool = False, **run
) -> Path:
    """A tiny CPU training config over the test corpus (`workers` loader processes); returns the TOML path."""
    dims = ", ".join(f"{k} = {v}" for k, v in TINY.to_dict().items())
    run_items = {
        "out_dir": str(tmp_path / name),
        "device": "cpu",
        "precision": "fp32",
        "cmvn_batches": 2,
        "log_every": 2,
        "eval_every": 5,
        "save_every": 3,
        "keep_last": 3,
    } | run
    text = f"""
[model]
{dims.replace(", ", chr(10))}
[data]
train = [{{ path = "{corpus / "train.jsonl"}" }}]
dev = [{{ path = "{corpus / "train.jsonl"}" }}]
max_batch_seconds = 9.0
num_workers = {workers}
dev_limit = 3
max_ctc_density = 1.0
[data.augment]
on_device = {json.dumps(augment_on_device)}
[optim]
max_steps = 14
warmup_steps = 3
[run]
""" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in run_items.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    good = {"data": {"train": [{"path": "x"}]}}
    cases = [
        ({**good, "optim": {"lrr": 1}}, "optim.lrr: unknown key"),
        ({**good, "optim": {"lr": -1}}, "optim.lr: must be > 0"),
        ({**good, "optim": {"schedule": "linear"}}, "optim.schedule: must be one of cosine, noam"),
        ({**good, "run": {"precision": "fp8"}}, "run.precision"),
        ({"data": {"train": [{"path": "x"}], "worker_nice": 25}}, "data.worker_nice: must be between 0 and 19"),
        ({**good, "data": {"train": [{"path": 3}]}}, r"data.train\[0\].path: expected str"),
        ({**good, "model": {"d_model": 100}}, "model: d_model"),
        ({"data": {"train": []}}, "data.train: must be at least one source"),
        ({"data": {"train": [{"path": "x", "exclude_ids": "(["}]}}, r"data.train\[0\]: exclude_ids: not a valid"),
        ({}, "data: required"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_config(raw)
    (tmp_path / "bad.toml").write_text("[optim\nlr=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    load_config(ROOT / "configs" / "default.toml")  # the shipped config is valid


def test_missing_data_fails_before_any_work(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[data]\ntrain = [{{ path = "{tmp_path / "nowhere.jsonl"}" }}]\n[run]\nout_dir = "{tmp_path / "r"}"\n'
    )
    assert asr_main(["train", "--config", str(cfg)]) == 2
    assert "data path not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


class _Niceness(torch.utils.data.Dataset):
    """Each item is the niceness of the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return os.nice(0)


def test_loader_workers_yield_the_cpu_to_the_main_process() -> None:
    cfg = parse_config({"data": {"train": [{"path": "x"}], "worker_nice": 7}})
    loader = torch.utils.data.DataLoader(
        _Niceness(), batch_size=None, num_workers=2, worker_init_fn=worker_init(cfg.data)
    )
    main = os.nice(0)
    assert list(loader) == [min(19, main + 7)] * 2 and os.nice(0) == main


@pytest.mark.gpu
@pytest.mark.parametrize("on_device", [False, True], ids=["augment-in-workers", "augment-on-device"])
def test_features_and_forward_never_wait_for_the_gpu(tiny_corpus: Path, on_device: bool) -> None:
    """A step's host work runs ahead of the device up to the CTC loss: no synchronising call in the device
    augmentation, features, SpecAugment or the forward pass (a blocking copy, `.item()`, a length read back)."""
    augment = {"on_device": on_device, "reverb": 1.0, "noise": 1.0}
    cfg = parse_config({"data": {"train": [{"path": str(tiny_corpus)}], "augment": augment}})
    ds = SpeechDataset(read_source(tiny_corpus).utterances[:4], Tokenizer())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, pin_memory=True)))
    device = torch.device("cuda")
    model = ASRModel(TINY).to(device)
    logmel, generator = BatchLogMel().to(device), torch.Generator(device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        feats, lengths = batch_features(batch, logmel, model.cmvn_mean, cfg, device, generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(feats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.shape[:2] == (4, int(ASRModel.output_lengths(lengths).max())) and lengths.device.type == "cpu"


def test_reverb_and_noise_move_from_the_workers_to_the_device(tiny_corpus: Path) -> None:
    utts = read_source(tiny_corpus).utterances[:4]
    batch = collate([SpeechDataset(utts, Tokenizer())[i] for i in range(4)])
    args = (BatchLogMel(), torch.zeros(TINY.n_mels))
    feats = {}
    for on_device in (False, True):
        raw = {"train": [{"path": str(tiny_corpus)}], "augment": {"noise": 1.0, "on_device": on_device}}
        cfg = parse_config({"data": raw, "spec_augment": {"freq_masks": 0, "time_masks": 0}})
        feats[on_device], _ = batch_features(batch, *args, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
        workers = make_augmenter(cfg.data, utts, load=None).config
        assert (workers.noise, workers.reverb) == ((0.0, 0.0) if on_device else (1.0, cfg.data.augment.reverb))
    assert not torch.allclose(feats[True], feats[False], atol=1e-3)  # the device added noise


def test_schedule() -> None:
    cfg = OptimConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1) and lr_factor(500, cfg) == pytest.approx(0.1)
    noam = OptimConfig(warmup_steps=100, schedule="noam")
    assert lr_factor(99, noam) == pytest.approx(1.0) and lr_factor(399, noam) == pytest.approx(0.5)


def test_weight_decay_only_on_matrices() -> None:
    model = ASRModel(TINY)
    decay, no_decay = make_optimizer(model, OptimConfig()).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_spec_augment_masks() -> None:
    feats = torch.randn(3, 200, 80)
    lengths = torch.tensor([200, 120, 50])
    fill = torch.full((80,), 7.0)
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=3, time_width=0.1)
    out = spec_augment(feats, lengths, cfg, torch.Generator().manual_seed(0), fill)
    masked = out == 7.0
    assert masked.any() and torch.equal(out[~masked], feats[~masked])
    for b, n in enumerate(lengths.tolist()):
        time_masked = masked[b].all(dim=1)
        assert not time_masked[n:].any() and time_masked.sum() <= 3 * int(0.1 * n)
    again = spec_augment(feats, lengths, cfg, torch.Generator().manual_seed(0), fill)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    ("workers", "on_device"), [(0, False), (2, False), (0, True)], ids=["in-process", "2-loader-workers", "on-device"]
)
def test_resume_is_exact(tmp_path: Path, tiny_corpus: Path, workers: int, on_device: bool) -> None:
    """14 steps straight equal 5 steps, then a resume for 9 more; the 14 steps run through several epochs of the
    tiny corpus, and with loader workers one loader serves them all. With reverb and noise on the device, their
    draws come from the run's device generator, which checkpoints save."""
    straight = train(load_config(_config(tmp_path, tiny_corpus, "a", workers, on_device)), progress=False)
    cfg_b = load_config(_config(tmp_path, tiny_corpus, "b", workers, on_device))
    first = train(cfg_b, progress=False, until_step=5)
    assert first.step == 5
    second = train(cfg_b, resume=tmp_path / "b", progress=False)
    assert straight.step == second.step == 14
    epochs = [int(line.split(",")[1]) for line in (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs[-1] >= 2, f"the run should cross epochs: {epochs}"
    a, b = _weights(straight.last_checkpoint), _weights(second.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    metrics = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("step,epoch,loss,lr,grad_norm,audio_s_per_s,mfu,dev_wer")
    assert (tmp_path / "b" / "best" / "model.safetensors").is_file()
    assert any((tmp_path / "b" / "tb").iterdir())
    kept = sorted(p.name for p in (tmp_path / "b").glob("ckpt-*"))
    assert kept == ["ckpt-00000010", "ckpt-00000012", "ckpt-00000014"]


def test_sigkill_mid_run_resumes_from_last_good_checkpoint(tmp_path: Path, tiny_corpus: Path) -> None:
    reference = train(load_config(_config(tmp_path, tiny_corpus, "ref", save_every=1)), progress=False)
    cfg_path = _config(tmp_path, tiny_corpus, "killed", save_every=1)
    run_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "training", "--config", str(cfg_path), "-q"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("ckpt-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # a test harness waiting for another process; nothing to await here
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir / ".ckpt-00000099.tmp").mkdir()  # what a kill during a save leaves behind
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name.startswith("ckpt-") and (ckpt / "trainer.json").is_file()
    resumed = train(load_config(cfg_path), resume=run_dir, progress=False)
    a, b = _weights(reference.last_checkpoint), _weights(resumed.last_checkpoint)
    assert resumed.step == 14 and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_under_torchrun(tmp_path: Path, tiny_corpus: Path) -> None:
    cfg = _config(tmp_path, tiny_corpus, "ddp")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port for the rendezvous (torchrun does not take port 0)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    cmd = [*torchrun, "-m", "training", "--config", str(cfg), "-q", "--until-step", "4"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("stopped at step 4") == 1  # rank 0 reports
    assert latest_checkpoint(tmp_path / "ddp").name == "ckpt-00000004"


def test_plot(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    train(load_config(_config(tmp_path, tiny_corpus, "p")), progress=False, until_step=6)
    assert asr_main(["plot", str(tmp_path / "p")]) == 0
    png = tmp_path / "p" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert asr_main(["plot", str(tmp_path)]) == 2
    assert "no metrics.csv" in capsys.readouterr().err


def test_flops_estimate_matches_a_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from training.metrics import forward_flops_per_second_of_audio

    model = ASRModel(TINY)
    seconds = 6.4
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, int(seconds * 100), 80))
    estimate = forward_flops_per_second_of_audio(TINY) * seconds
    assert math.isclose(estimate, counter.get_total_flops(), rel_tol=0.35)


def test_init_from_starts_from_a_model_dir(tmp_path: Path, tiny_corpus: Path, tiny_model_dir: Path) -> None:
    from asr.checkpoint import load_model
    from asr.data import DataError
    from training.loop import Trainer

    source, config = load_model(tiny_model_dir)
    trainer = Trainer(load_config(_config(tmp_path, tiny_corpus)), None, False, init_from=tiny_model_dir)
    mine = trainer.model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in source.state_dict().items())
    assert torch.equal(trainer.model.cmvn.mean, config.cmvn.mean) and trainer.state.step == 0
    resumed = Trainer(load_config(_config(tmp_path, tiny_corpus)), tmp_path / "empty", False, init_from=tiny_model_dir)
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in source.state_dict().items())
    deeper = _config(tmp_path, tiny_corpus, "deeper")
    deeper.write_text(deeper.read_text().replace(f"n_layers = {TINY.n_layers}", f"n_layers = {TINY.n_layers + 1}"))
    grown = Trainer(load_config(deeper), None, False, init_from=tiny_model_dir).model.eval()
    feats = torch.randn(1, 50, 80)
    with torch.inference_mode():
        torch.testing.assert_close(grown(feats), source(feats), rtol=1e-5, atol=1e-5)
    for edit in (f"n_layers = {TINY.n_layers - 1}", f"d_model = {2 * TINY.d_model}"):
        other = _config(tmp_path, tiny_corpus, "other")
        key = edit.split(" = ")[0]
        value = getattr(TINY, key)
        other.write_text(other.read_text().replace(f"{key} = {value}", edit))
        with pytest.raises(DataError, match="only a larger n_layers may differ"):
            Trainer(load_config(other), None, False, init_from=tiny_model_dir)


def test_exclude_ids_leaves_out_matching_utterances(tiny_corpus: Path) -> None:
    from training.config import SourceConfig
    from training.loop import _read

    everything = _read(SourceConfig(str(tiny_corpus / "train.jsonl"))).utterances
    first = everything[0].id
    rest = _read(SourceConfig(str(tiny_corpus / "train.jsonl"), exclude_ids=f"{first}|nothing")).utterances
    assert [u.id for u in rest] == [u.id for u in everything[1:]]


def test_compiled_run_trains_like_eager(tmp_path: Path, tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run.compile = true` compiles the blocks (here with dynamo's "eager" backend: the CPU cannot afford
    inductor in a unit test) and trains to the weights of the plain run, dev decoding included."""
    compile_blocks, calls = ASRModel.compile_blocks, []

    def eager_backend(model: ASRModel, backend: str = "inductor") -> None:
        calls.append(backend)
        compile_blocks(model, "eager")

    monkeypatch.setattr(ASRModel, "compile_blocks", eager_backend)
    torch._dynamo.reset()
    plain = train(load_config(_config(tmp_path, tiny_corpus, "plain")), progress=False)
    compiled = train(load_config(_config(tmp_path, tiny_corpus, "compiled", compile=True)), progress=False)
    assert calls == ["inductor"]
    a, b = _weights(plain.last_checkpoint), _weights(compiled.last_checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert compiled.best_wer == plain.best_wer


@pytest.mark.parametrize("old, new", [(12, 16), (2, 3), (3, 3), (2, 7)])
def test_grown_model_computes_what_its_source_did(old: int, new: int) -> None:
    from dataclasses import replace

    from training.grow import grown_state_dict, layer_sources

    plan = layer_sources(old, new)
    assert len(plan) == new and [b for b, copy in plan if not copy] == list(range(old))
    assert [b for b, _ in plan] == sorted(b for b, _ in plan)  # every copy follows its source block
    if (old, new) == (12, 16):
        assert [i for i, (_, copy) in enumerate(plan) if copy] == [3, 7, 11, 15]
    if old > 3:
        return
    torch.manual_seed(new)
    source = ASRModel(replace(TINY, n_layers=old)).eval()
    for p in source.parameters():
        p.data.add_(0.1 * torch.randn_like(p))  # out_proj is not near zero in a trained model either
    deeper = ASRModel(replace(TINY, n_layers=new)).eval()
    deeper.load_state_dict(grown_state_dict(source, deeper.dims))
    feats = torch.randn(2, 60, 80)
    with torch.inference_mode():
        torch.testing.assert_close(deeper(feats), source(feats), rtol=1e-5, atol=1e-5)
    for index, (block, copy) in enumerate(plan):
        assert torch.equal(deeper.layers[index].mixer.in_proj.weight, source.layers[block].mixer.in_proj.weight)
        assert bool(deeper.layers[index].mixer.out_proj.weight.any()) == (not copy)
    with pytest.raises(ValueError, match="only n_layers may differ"):
        grown_state_dict(source, replace(TINY, n_layers=new, d_state=16))
    with pytest.raises(ValueError, match="can only add layers"):
        layer_sources(new + 1, new)


def test_run_throughput_skips_each_calls_first_windows_and_dev_decoding(tmp_path: Path) -> None:
    from bench.run_throughput import throughput

    header = "step,epoch,loss,lr,grad_norm,audio_s_per_s,mfu,dev_wer,elapsed_s\n"
    # call 1: windows of 1 s; the dev window (rate 10) is left out; call 2 restarts elapsed_s
    rates = [(1, 5), (2, 5), (3, 100), (4, 300), (5, 10, 0.3), (6, 100), (7, 5), (8, 5), (9, 200)]
    rows, t = [], 0.0
    for i, (step, rate, *dev) in enumerate(rates):
        t = 1.0 if i == 6 else t + 1.0 + (step == 9)  # the last window lasts 2 s
        rows.append(f"{step * 25},0,1.0,1e-3,1.0,{rate},0.01,{dev[0] if dev else ''},{t}\n")
    (tmp_path / "metrics.csv").write_text(header + "".join(rows))
    got = throughput(tmp_path / "metrics.csv")
    assert got.windows == 4  # 100, 300, 100 of call 1 and 200 of call 2
    assert got.median == 150 and math.isclose(got.time_weighted, (100 + 300 + 100 + 2 * 200) / 5)
