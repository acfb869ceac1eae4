"""The model on CUDA, where the Triton scan and the fused Triton step replace the PyTorch path, and the
CUDA-graphed `EncoderStepper`. Run with `TRITON_INTERPRET=0 pytest -m gpu`."""

import random

import pytest
import torch

import asr.model
import kernels.encoder_step
import kernels.frame_step
from asr import DEFAULT_MODEL_DIR
from asr.checkpoint import load_model
from asr.features import CMVN, N_MELS
from asr.model import ASRModel, Impl, ModelDimensions
from asr.stepper import EncoderStepper

pytestmark = pytest.mark.gpu

DIMS = ModelDimensions(d_model=128, n_layers=3, d_state=64, head_dim=64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def models() -> tuple[ASRModel, ASRModel]:
    torch.manual_seed(random.randrange(2**31))
    cmvn = CMVN(torch.randn(N_MELS), torch.rand(N_MELS) + 0.5)
    cpu = ASRModel(DIMS, cmvn)
    gpu = ASRModel(DIMS, cmvn).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def test_cuda_forward_and_gradients_match_cpu(models: tuple[ASRModel, ASRModel]) -> None:
    cpu, gpu = models
    feats = torch.randn(3, 401, N_MELS)
    out_cpu, out_gpu = cpu(feats), gpu(feats.cuda())
    assert _rel(out_gpu.cpu(), out_cpu) < 5e-3
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert torch.isfinite(p_gpu.grad).all(), name
        assert _rel(p_gpu.grad.cpu(), p_cpu.grad) < 2e-2, name


def test_cuda_bf16_training_step_is_finite(models: tuple[ASRModel, ASRModel]) -> None:
    _, gpu = models
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpu(torch.randn(4, 800, N_MELS, device="cuda")).float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters())


def test_inductor_compiled_blocks_match_eager_in_bf16_without_recompiling(models: tuple[ASRModel, ASRModel]) -> None:
    """Training's `compile_blocks` on CUDA (inductor, the Triton scan between the compiled pieces): the bf16
    autocast loss and gradients of eager, for batches of several sizes and lengths compiled once."""
    _, gpu = models
    compiled = ASRModel(DIMS, gpu.cmvn).cuda()
    compiled.load_state_dict(gpu.state_dict())
    compiled.compile_blocks()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for i, (b, t) in enumerate([(6, 1203), (4, 1001), (9, 810)]):  # B L above the 644 of a size guard
        feats = torch.randn(b, t, N_MELS, device="cuda")
        losses = []
        for model, stance in ((gpu, "default"), (compiled, "fail_on_recompile" if i else "default")):
            model.zero_grad()
            with torch.compiler.set_stance(stance), torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(feats).float().square().mean()
            loss.backward()
            losses.append(loss)
        assert _rel(losses[1], losses[0]) < 1e-2
        for (name, p), q in zip(gpu.named_parameters(), compiled.parameters(), strict=True):
            assert _rel(q.grad, p.grad) < 3e-2, name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # compiled: the pieces around the scan


@torch.inference_mode()
def test_cuda_streaming_equals_offline(models: tuple[ASRModel, ASRModel]) -> None:
    _, gpu = models
    gpu.eval()
    feats = torch.randn(2, 4 * 300, N_MELS, device="cuda")
    offline = gpu(feats)
    state = gpu.init_state(2)
    assert all(layer.ssm.dtype == torch.float32 and layer.ssm.is_cuda for layer in state.layers)
    out, i = [], 0
    while i < feats.shape[1]:
        n = 4 * random.randint(1, 40)
        out.append(gpu.chunk(feats[:, i : i + n], state)[0])
        i += n
    assert _rel(torch.cat(out, 1), offline) < 2e-3


@torch.inference_mode()
@pytest.mark.parametrize("frontend_kernels", [False, True], ids=["cudnn-frontend", "triton-frontend"])
def test_fused_step_equals_torch_step(
    models: tuple[ASRModel, ASRModel], monkeypatch: pytest.MonkeyPatch, frontend_kernels: bool
) -> None:
    """Streaming chunks go through the Triton step kernels (longer ones in pieces of 16 frames), after the cuDNN
    front end or the Triton front-end kernels (which large batches take; here forced); the pure-PyTorch path on the
    same GPU agrees closely, with its cuDNN convs held to float32 (PyTorch lets them use TF32 by default, 4e-4
    off). (The offline forward's Triton chunked scan runs its dots in TF32.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(asr.model, "FRONTEND_KERNEL_MIN_FRAMES", 1 if frontend_kernels else 10**9)
    _, gpu = models
    gpu.eval()
    feats = torch.randn(3, 4 * 200, N_MELS, device="cuda")
    fused, plain = gpu.init_state(3), gpu.init_state(3)
    a, b, i = [], [], 0
    while i < feats.shape[1]:
        n = 4 * random.choice([1, 2, 3, 5, 8, 16, 17, 40])
        a.append(gpu.chunk(feats[:, i : i + n], fused)[0])
        b.append(gpu.chunk(feats[:, i : i + n], plain, impl=Impl.TORCH)[0])
        i += n
    assert _rel(torch.cat(a, 1), torch.cat(b, 1)) < 1e-4
    assert _rel(torch.cat(a, 1), gpu(feats)) < 2e-3
    for la, lb in zip(fused.layers, plain.layers, strict=True):
        assert la.ssm.dtype == torch.float32 and _rel(la.ssm, lb.ssm) < 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_stepper_equals_eager(models: tuple[ASRModel, ASRModel], dtype: torch.dtype) -> None:
    """Random subsets of 37 streams (padded to graph buckets) in random chunk sizes up to 40 frames: the CUDA
    graphs give the eager fused step's log-probs, and each stream its own offline result; also when the
    features are written into the graph's own input (`inputs`, no copy), every other call."""
    _, gpu = models
    gpu = gpu.to(dtype).eval()
    graphed = EncoderStepper(gpu, capacity=48, device="cuda")
    eager = EncoderStepper(gpu, capacity=48, device="cuda", graphs=False)
    slots = random.sample(range(48), 37)
    feats = torch.randn(48, 4 * 120, N_MELS, device="cuda")
    done, out = dict.fromkeys(slots, 0), {s: [] for s in slots}
    while any(v < 120 for v in done.values()):
        active = [s for s in slots if done[s] < 120 and random.random() < 0.6] or [s for s in slots if done[s] < 120]
        n = min(random.choice([1, 2, 4, 7, 16, 40]), *(120 - done[s] for s in active))
        rows = [feats[s, 4 * done[s] : 4 * (done[s] + n)] for s in active]
        batch = torch.stack(rows, out=graphed.inputs(len(active), n) if random.random() < 0.5 else None)
        want = eager(batch.clone(), active)  # before the graphed call: its buffer may be the graph's input
        got = graphed(batch, active).clone()
        # the graph's batch is padded to its bucket, so cuBLAS may pick another GEMM kernel: float32 rounding only
        assert _rel(got, want) < (2e-4 if dtype == torch.float32 else 1e-2), f"{n} frames"
        for row, s in enumerate(active):
            out[s].append(got[row])
            done[s] += n
    assert graphed.captured and all(size in (1, 2, 4, 8, 16, 32, 64) for size, _ in graphed.captured)
    offline = gpu(feats[slots]).float().log_softmax(-1)
    streamed = torch.stack([torch.cat(out[s]) for s in slots])
    assert _rel(streamed, offline) < (2e-3 if dtype == torch.float32 else 3e-2)


@torch.inference_mode()
def test_sixty_minute_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """90,000 encoder frames (60 minutes at 40 ms) of one stream at the default model size, fed through the
    graphed fused step in random chunks of 1-16 frames: every minute's logits agree with one offline forward over
    the same input (relative error <= 1e-3), with no growth of the error, and the final SSM state with the
    pure-PyTorch reference's over the whole input in one call (its cuDNN convs held to float32, not TF32). On a
    fresh machine (Triton's cache empty) each of the 16 chunk lengths' first calls compiles for 11-20 s on an H100
    (`bench/first_calls.py`, BENCHMARKS session 18): give this test about 10 minutes of its own, or run
    `scripts/precompile_sixty.py` first (all lengths at once: 25 s, then this test 41 s, on an H100; session 19)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(random.randrange(2**31))
    dims = ModelDimensions()
    model = ASRModel(dims, CMVN(torch.zeros(N_MELS), torch.ones(N_MELS))).cuda().eval()
    frames = 90_000
    feats = torch.randn(1, 4 * frames, N_MELS, device="cuda")
    stepper = EncoderStepper(model, capacity=4, device="cuda")
    streamed, i = torch.empty(frames, dims.vocab_size, device="cuda"), 0
    while i < frames:
        n = min(random.randint(1, 16), frames - i)
        streamed[i : i + n] = stepper(feats[:, 4 * i : 4 * (i + n)], [2])[0]
        i += n
    offline = model(feats)[0].float().log_softmax(-1)
    reference = model.init_state(1)
    model.chunk(feats, reference, impl=Impl.TORCH)  # one call, float32 throughout
    minute = 1500
    errors = [_rel(streamed[m : m + minute], offline[m : m + minute]) for m in range(0, frames, minute)]
    assert max(errors) <= 1e-3, f"per-minute relative errors {errors}"
    assert errors[-1] <= max(5 * errors[0], 1e-5), f"the error grew over the hour: {errors[0]:.2e} -> {errors[-1]:.2e}"
    for mine, ref in zip(stepper.pool.layers, reference.layers, strict=True):
        assert mine.ssm.dtype == torch.float32
        assert _rel(mine.ssm[2:3], ref.ssm) <= 1e-3
    print(
        f"60-minute stream: per-minute logit relative error {errors[0]:.2e} (minute 1) .. {errors[-1]:.2e} "
        f"(minute 60), max {max(errors):.2e}"
    )


@torch.inference_mode()
@pytest.mark.parametrize("streams", [1, 8], ids=["one-launch", "per-layer"])
def test_bundled_model_streams_as_offline(streams: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled model (16 blocks, int8 storage) as the server runs it on CUDA: the graphed stepper fed random
    chunk sizes gives the offline log-probs, through the one-launch step (1 stream) and the per-layer step (8);
    which one ran is counted (the graphs call the step when they are captured). The one-frame graph's launch is
    given the graph's own workspace, which the replays leave zeroed."""
    launches, works = [], []
    one_launch, frame_step = kernels.encoder_step.encoder_step, kernels.frame_step.frame_step
    monkeypatch.setattr(kernels.encoder_step, "encoder_step", lambda *a, **k: launches.append(1) or one_launch(*a, **k))
    monkeypatch.setattr(
        kernels.frame_step, "frame_step", lambda *a, **k: works.append(k["work"]) or frame_step(*a, **k)
    )
    model, _ = load_model(DEFAULT_MODEL_DIR, device="cuda")
    stepper = EncoderStepper(model, capacity=streams, device="cuda")
    frames = 300
    feats = 3 * torch.randn(streams, 4 * frames, N_MELS, device="cuda") - 8  # raw log-mel range
    slots, done, out = list(range(streams)), 0, []
    while done < frames:
        n = min(random.choice([1, 2, 4, 7, 16]), frames - done)
        out.append(stepper(feats[:, 4 * done : 4 * (done + n)], slots).clone())
        done += n
    offline = model(feats).float().log_softmax(-1)
    assert _rel(torch.cat(out, dim=1), offline) < 2e-3
    assert bool(launches) == (streams == 1), f"{len(launches)} one-launch calls for {streams} streams"
    assert bool(works) == (streams == 1), f"{len(works)} one-frame launches for {streams} streams"
    if streams == 1:
        kept = stepper._captured[(1, 1)].work
        assert kept is not None and all(w is kept for w in works), "the one-frame graph runs on a workspace of its own"
        assert not kept.any(), "the replays left the one-frame graph's workspace dirty"
