"""Stepping streams by slot in a state pool: `ASRModel.chunk(..., slots)`, the fused step path of the
Mamba layers (Triton's interpreter on the CPU), and `EncoderStepper` (eager on the CPU; its CUDA graphs
are tested in test_model_gpu.py)."""

import random
import secrets

import pytest
import torch

import asr.model
import kernels.encoder_step
import kernels.frontend
from asr.features import CMVN, N_MELS
from asr.model import ASRModel, Impl, MambaBlock
from asr.stepper import EncoderStepper, _Graph, bucket
from tests.conftest import TINY


@pytest.fixture
def model() -> ASRModel:
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    return ASRModel(TINY, CMVN(torch.randn(N_MELS), torch.rand(N_MELS) + 0.5)).eval()


def _chunks(total: int, rng: random.Random, most: int = 6) -> list[int]:
    """Random chunk sizes in encoder frames adding up to total."""
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(rng.randint(1, most), total - sum(sizes)))
    return sizes


@torch.inference_mode()
def test_pool_slots_equal_own_state(model: ASRModel) -> None:
    """Two streams at slots 3 and 0 of a pool of 5 step exactly as with their own state; other rows stay put."""
    rng = random.Random(secrets.randbits(32))
    feats = torch.randn(2, 4 * 30, N_MELS)
    own, pool = model.init_state(2), model.init_state(5)
    for t in pool.tensors():
        t.normal_()
    before = [t.clone() for t in pool.tensors()]
    for t in pool.tensors():
        t[[3, 0]] = 0
    slots = torch.tensor([3, 0])
    a, b, i = [], [], 0
    for n in _chunks(30, rng):
        a.append(model.chunk(feats[:, 4 * i : 4 * (i + n)], own)[0])
        b.append(model.chunk(feats[:, 4 * i : 4 * (i + n)], pool, slots)[0])
        i += n
    assert torch.equal(torch.cat(a, 1), torch.cat(b, 1))
    for t, old in zip(pool.tensors(), before, strict=True):
        assert torch.equal(t[[1, 2, 4]], old[[1, 2, 4]])


def test_chunk_checks_slots(model: ASRModel) -> None:
    pool = model.init_state(4)
    for bad, message in ((torch.tensor([1, 1]), "distinct"), (torch.tensor([0, 4]), "must index the pool")):
        with pytest.raises(ValueError, match=message):
            model.chunk(torch.randn(2, 8, N_MELS), pool, bad)
        with pytest.raises(ValueError, match=message):
            model.layers[0].chunk(torch.randn(2, 2, TINY.d_model), pool.layers[0], bad)
    with pytest.raises(ValueError, match="holds 4 streams but the input 2"):
        model.chunk(torch.randn(2, 8, N_MELS), pool)


@torch.inference_mode()
def test_fused_step_layer_equals_torch_layer() -> None:
    """A Mamba block through the fused Triton step (interpreted) equals the PyTorch path on the same pool rows,
    over chained chunks of random length."""
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    block = MambaBlock(TINY).eval()
    pool_a = ASRModel(TINY).init_state(6).layers[0]
    for t in (pool_a.conv, pool_a.ssm):
        t.normal_()
    pool_b = type(pool_a)(pool_a.conv.clone(), pool_a.ssm.clone())
    slots = torch.tensor([4, 1, 2])
    x = torch.randn(3, 14, TINY.d_model)
    ys_a, ys_b, i = [], [], 0
    for n in _chunks(14, rng, most=6):
        ys_a.append(block.chunk(x[:, i : i + n], pool_a, slots, Impl.STEP)[0])
        ys_b.append(block.chunk(x[:, i : i + n], pool_b, slots, Impl.TORCH)[0])
        i += n
    torch.testing.assert_close(torch.cat(ys_a, 1), torch.cat(ys_b, 1), rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    torch.testing.assert_close(pool_a.ssm, pool_b.ssm, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    assert torch.equal(pool_a.conv, pool_b.conv)


def test_impl_pick() -> None:
    x = torch.zeros(1, 16, 4)
    assert Impl.pick(x) is Impl.TORCH  # CPU


@torch.inference_mode()
def test_stepper_streams_equal_offline(model: ASRModel) -> None:
    """Three streams joining and leaving a stepper at different times, stepped in random subsets and chunk
    sizes, each get the logits of one offline pass over their own audio."""
    rng = random.Random(secrets.randbits(32))
    stepper = EncoderStepper(model, capacity=4, device="cpu")
    assert not stepper.graphs
    lengths = {0: 24, 2: 40, 3: 17}  # slot -> encoder frames
    feats = {s: torch.randn(1, 4 * n, N_MELS) for s, n in lengths.items()}
    done = dict.fromkeys(lengths, 0)
    out = {s: [] for s in lengths}
    stepper.reset(list(lengths))
    while any(done[s] < lengths[s] for s in lengths):
        active = [s for s in lengths if done[s] < lengths[s] and rng.random() < 0.7]
        if not active:
            continue
        n = min(rng.randint(1, 20), *(lengths[s] - done[s] for s in active))
        batch = torch.cat([feats[s][:, 4 * done[s] : 4 * (done[s] + n)] for s in active])
        log_probs = stepper(batch, active)
        for row, s in enumerate(active):
            out[s].append(log_probs[row])
            done[s] += n
    for s in lengths:
        offline = model(feats[s])[0].log_softmax(-1)
        torch.testing.assert_close(torch.cat(out[s]), offline, rtol=1e-5, atol=1e-5)


def test_stepper_rejects_bad_input(model: ASRModel) -> None:
    stepper = EncoderStepper(model, capacity=3, device="cpu")
    cases = [
        (torch.randn(2, 8, N_MELS), [0, 0], "distinct"),
        (torch.randn(2, 8, N_MELS), [0, 3], "distinct and in \\[0, 3\\)"),
        (torch.randn(1, 8, N_MELS), [], "no slots"),
        (torch.randn(2, 8, N_MELS), [0], "feats must be"),
        (torch.randn(1, 6, N_MELS), [1], "multiple of 4"),
    ]
    for feats, slots, message in cases:
        with pytest.raises(ValueError, match=message):
            stepper(feats, slots)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        EncoderStepper(model, capacity=3, device="cpu", graphs=True)


def test_warmup_captures_each_bucket_and_frame_count_once(
    model: ASRModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`warmup` captures every (bucket, frames) not yet captured, with a progress bar when asked. The capture
    itself needs CUDA (test_model_gpu.py): here it is recorded instead."""
    stepper = EncoderStepper(model, capacity=5, device="cpu")
    stepper.warmup([1, 4])  # no graphs: nothing to capture
    assert stepper.captured == []
    captures = []
    monkeypatch.setattr(stepper, "graphs", True)
    monkeypatch.setattr(stepper, "_capture", lambda size, frames: captures.append((size, frames)) or object())
    stepper.warmup([1, 4], progress=True)
    assert captures == [(1, 1), (1, 4), (2, 1), (2, 4), (4, 1), (4, 4), (8, 1), (8, 4)]
    assert "capturing CUDA graphs" in capsys.readouterr().err
    stepper.warmup([4, 2], batches=[3], progress=False)
    assert captures[8:] == [(4, 2)] and capsys.readouterr().err == ""


def test_inputs_buffer(model: ASRModel) -> None:
    """Without graphs `inputs` is a new buffer of the call's shape, which the call takes as any features."""
    stepper = EncoderStepper(model, capacity=3, device="cpu")
    feats = torch.randn(2, 8, N_MELS)
    buf = stepper.inputs(2, 2)
    assert buf.shape == (2, 8, N_MELS) and buf.dtype == torch.float32
    buf.copy_(feats)
    torch.testing.assert_close(stepper(buf, [0, 2]), EncoderStepper(model, capacity=3, device="cpu")(feats, [0, 2]))
    for batch, frames in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            stepper.inputs(batch, frames)
    with pytest.raises(ValueError, match="at most the capacity 3"):
        stepper.inputs(4, 1)


def test_graph_input_is_written_in_place_or_copied(model: ASRModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under graphs (the capture recorded, as CUDA is needed for it): `inputs` is the captured graph's own static
    input, rows [:batch] of its bucket; a replay sees the features written there, and features given in any other
    tensor are copied there first."""
    stepper = EncoderStepper(model, capacity=5, device="cpu")
    seen: list[torch.Tensor] = []

    def capture(size: int, frames: int) -> _Graph:
        with torch.inference_mode(False):  # as `_capture` makes it: a plain tensor that `inputs` hands out
            feats = torch.zeros(size, 4 * frames, N_MELS)
        replay = type("Replay", (), {"replay": lambda _: seen.append(feats.clone())})()
        log_probs = torch.zeros(size, frames, model.dims.vocab_size)
        return _Graph(replay, feats, torch.full((size,), stepper.spare), log_probs, (stepper.spare,) * size, None)

    monkeypatch.setattr(stepper, "graphs", True)
    monkeypatch.setattr(stepper, "_capture", capture)
    buf = stepper.inputs(3, 2)
    assert buf.shape == (3, 8, N_MELS) and buf.data_ptr() == stepper._captured[(4, 2)].feats.data_ptr()
    written = torch.randn(3, 8, N_MELS)
    buf.copy_(written)
    stepper(buf, [0, 2, 4])
    given = torch.randn(3, 8, N_MELS)
    stepper(given, [0, 2, 4])
    assert torch.equal(seen[0][:3], written) and torch.equal(seen[1][:3], given)


def test_bucket() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 64, 65, 1000)] == [1, 2, 4, 8, 64, 128, 1024]


@pytest.mark.parametrize("with_slots", [True, False], ids=["pool-slots", "own-state"])
@pytest.mark.parametrize("frontend_kernels", [False, True], ids=["torch-frontend", "triton-frontend"])
@torch.inference_mode()
def test_whole_model_step_impl_equals_torch(model: ASRModel, monkeypatch, frontend_kernels: bool, with_slots) -> None:
    """ASRModel.chunk by the fused step and fused add + RMSNorm kernels (interpreted), with the front end in PyTorch
    or in the Triton front-end kernels (which large batches take), equals the PyTorch path, on pool slots and on a
    state of its own (no slots); the last chunk (17 frames) runs as two kernel calls of 16 and 1."""
    monkeypatch.setattr(asr.model, "FRONTEND_KERNEL_MIN_FRAMES", 1 if frontend_kernels else 10**9)
    calls = []
    monkeypatch.setattr(kernels.frontend, "frontend_step", _counting(kernels.frontend.frontend_step, calls))
    slots = torch.tensor([2, 0]) if with_slots else None
    fused, plain = model.init_state(3 if with_slots else 2), model.init_state(3 if with_slots else 2)
    feats = torch.randn(2, 4 * 21, N_MELS)
    a = [model.chunk(feats[:, i : i + 8], fused, slots, impl=Impl.STEP)[0] for i in (0, 8)]
    a.append(model.chunk(feats[:, 16:], fused, slots, impl=Impl.STEP)[0])
    b = model.chunk(feats, plain, slots, impl=Impl.TORCH)[0]
    torch.testing.assert_close(torch.cat(a, 1), b, rtol=1e-4, atol=1e-4)
    for la, lb in zip(fused.layers, plain.layers, strict=True):
        torch.testing.assert_close(la.ssm, lb.ssm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.frontend.conv2, plain.frontend.conv2, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.frontend.conv1, plain.frontend.conv1)
    assert len(calls) == (4 if frontend_kernels else 0)  # 3 chunks, the last in 2 pieces


def _counting(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


@torch.inference_mode()
def test_one_launch_encoder_step_equals_torch(model: ASRModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """ASRModel.chunk with the model's stacked weights (the one-launch encoder step, which the CUDA stepper uses
    for up to MAX_ROWS rows; interpreted here phase by phase) equals the PyTorch path over chained chunks; the
    17-frame chunk of two streams runs as launches of 8, 8 and 1 frames."""
    calls = []
    monkeypatch.setattr(kernels.encoder_step, "encoder_step", _counting(kernels.encoder_step.encoder_step, calls))
    slots, weights = torch.tensor([2, 0]), model.encoder_weights()
    fused, plain = model.init_state(3), model.init_state(3)
    feats = torch.randn(2, 4 * 21, N_MELS)
    a = [model.chunk(feats[:, i : i + 8], fused, slots, impl=Impl.STEP, weights=weights)[0] for i in (0, 8)]
    a.append(model.chunk(feats[:, 16:], fused, slots, impl=Impl.STEP, weights=weights)[0])
    b = model.chunk(feats, plain, slots, impl=Impl.TORCH)[0]
    torch.testing.assert_close(torch.cat(a, 1), b, rtol=1e-4, atol=1e-4)
    for la, lb in zip(fused.layers, plain.layers, strict=True):
        torch.testing.assert_close(la.ssm, lb.ssm, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(la.conv, lb.conv, rtol=1e-4, atol=1e-4)
    assert len(calls) == 5  # 2 chunks of 2 frames (a launch each), and 17 frames as 8 + 8 + 1
