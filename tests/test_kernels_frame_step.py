"""The one-frame step of the whole model (`kernels.frame_step.frame_step`: log-mel to logits) against
`frame_step_ref`, and through `ASRModel.chunk(..., weights=)`.

CPU tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), which launches it phase
by phase: a spinning grid barrier cannot run there. `test_kernel_compiles_for_hopper` compiles the one-launch form
for sm_90; the gpu-marked tests run it on a GPU. Every test draws fresh inputs from a random seed and names it in
its failure messages.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import kernels.frame_step
from asr.features import N_MELS
from asr.model import ASRModel, Impl, ModelDimensions
from kernels.encoder_step import EncoderWeights, stacked_pool
from kernels.frame_step import frame_step, frame_step_ref, work_words
from kernels.frontend import FrontEndWeights
from kernels.static import compile_frame_kernel
from tests.conftest import TINY
from tests.test_kernels_encoder_step import SMALL, _model, _rel, assert_within
from tests.test_kernels_encoder_step import _float32 as float32_layers

# every tile masked: d_model / 2, head_dim and d_state below their powers of two; two heads a group, conv width 3
MASKED = ModelDimensions(d_model=24, n_layers=2, d_state=12, head_dim=12, n_groups=2, d_conv=3, frontend_channels=4)
POOL = 6
POOL_NAMES = ("conv1 cache", "conv2 cache", "conv cache", "ssm state")


def _random_pools(model: ASRModel, seed: int, device: str, pool: int) -> tuple[torch.Tensor, ...]:
    """frame_step's pools (the front end's conv1 and conv2 caches, the layers' stacked conv and ssm) of random
    contents, the same for the same seed."""
    state = model.init_state(pool, device)
    gen = torch.Generator().manual_seed(seed)
    for t in state.tensors():
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    layers = state.layers
    conv, ssm = stacked_pool([s.conv for s in layers]), stacked_pool([s.ssm for s in layers])
    return state.frontend.conv1, state.frontend.conv2, conv, ssm


def _float32(w: EncoderWeights) -> EncoderWeights:
    return replace(float32_layers(w), front=FrontEndWeights(*(t.float() for t in w.front.tensors())))


def _check(seed: int, dims: ModelDimensions, b: int, dtype: torch.dtype, tol: float, device: str = "cpu",
           pool: int = POOL, calls: int = 2, log_probs: bool = False, keep_work: bool = False,
           **kwargs) -> None:  # fmt: skip
    """`calls` chained one-frame steps of frame_step on b streams (random slots, random log-mel) against
    frame_step_ref on the same random model and pools: logits (or log-probs) and every pool within relative error
    tol (`assert_within`), the slots outside untouched. `keep_work`: every call gets the same workspace, which must
    be all zero after each."""
    model = _model(seed, dims, dtype, device)
    w = model.encoder_weights()
    work = torch.zeros(work_words(b, w) + 5, dtype=torch.int32, device=device) if keep_work else None
    mine = _random_pools(model, seed, device, pool)
    ref, exact = tuple(t.clone() for t in mine), tuple(t.to(torch.float32, copy=True) for t in mine)
    before = tuple(t.clone() for t in mine)
    gen = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(pool, generator=gen)[:b].to(device)
    what = f"seed {seed}, {dims}, b {b}, {dtype}, log_probs {log_probs}, keep_work {keep_work}, {kwargs}"
    for call in range(calls):
        feats = (3 * torch.randn(b, 4, N_MELS, generator=gen) - 8).to(device)  # raw log-mel range
        with torch.inference_mode():
            out = frame_step(feats, w, *mine, slots, log_probs=log_probs, work=work, **kwargs)
            expected = frame_step_ref(feats, w, *ref, slots, log_probs=log_probs)
            exact32 = frame_step_ref(feats, _float32(w), *exact, slots, log_probs=log_probs)
        assert out.shape == (b, 1, dims.vocab_size) and out.dtype == expected.dtype, what
        if log_probs:
            assert torch.allclose(out.exp().sum(-1), torch.ones(b, 1, device=device), atol=1e-4), what
        if keep_work:
            assert not work.any(), f"the workspace is not zero after call {call}, {what}"
        named = zip(("logits", *POOL_NAMES), (out, *mine), (expected, *ref), (exact32, *exact), strict=True)
        assert_within(named, dtype, tol, f"call {call}, {what}")
    others = [s for s in range(pool) if s not in slots.tolist()]
    for name, t, old, front in zip(POOL_NAMES, mine, before, (True, True, False, False), strict=True):
        same = torch.equal(t[others], old[others]) if front else torch.equal(t[:, others], old[:, others])
        assert same, f"{name} changed outside the slots, {what}"


@pytest.mark.parametrize(
    ("dims", "b", "block_p"),
    [(TINY, 1, None), (SMALL, 3, None), (SMALL, 1, 16), (MASKED, 2, 8), (MASKED, 1, 16)],
    ids=["two-groups", "one-group-k3", "one-program-a-head", "masked", "masked-rows"],
)
def test_matches_ref(dims: ModelDimensions, b: int, block_p: int | None) -> None:
    """Default programs (4 state rows each), one program a head, and the masked shapes (rows past head_dim, columns
    past d_model / 2 and d_state)."""
    _check(secrets.randbits(32), dims, b, torch.float32, 1e-5, block_p=block_p)


@pytest.mark.usefixtures("bf16_as_on_the_gpu")
def test_matches_ref_bf16() -> None:
    _check(secrets.randbits(32), TINY, 2, torch.bfloat16, 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_a_kept_workspace(dtype: torch.dtype, bf16_as_on_the_gpu: None) -> None:
    """The log-softmax in the kernel's head (float32 whatever the model's dtype) against the reference's, three calls
    sharing one workspace, which each call leaves zeroed."""
    tol = 1.5 if dtype == torch.bfloat16 else 1e-5
    _check(secrets.randbits(32), SMALL, 2, dtype, tol, calls=3, log_probs=True, keep_work=True)


def _bad_cases(model: ASRModel):
    w = model.encoder_weights()
    pools = _random_pools(model, 0, "cpu", POOL)
    feats, slots = torch.randn(2, 4, N_MELS), torch.tensor([0, 1])
    yield "two frames", (feats.repeat(1, 2, 1), w, *pools, slots), {}, "one encoder frame a stream"
    yield "float64 feats", (feats.double(), w, *pools, slots), {}, "feats must be float32"
    yield "mels", (feats[:, :, :-1], w, *pools, slots), {}, "must have shape"
    half = ASRModel(model.dims).to(torch.float16)
    yield "float16", (feats, half.encoder_weights(), *_random_pools(half, 0, "cpu", POOL), slots), {}, "bfloat16 model"
    small = _random_pools(model, 0, "cpu", 2)
    yield "front pools", (feats, w, *small[:2], *pools[2:], slots), {}, "front-end pools"
    yield "block_p", (feats, w, *pools, slots), {"block_p": 6}, "power of two"
    yield "slots", (feats, w, *pools, torch.tensor([1, 1])), {}, "distinct"
    short = torch.zeros(work_words(2, w) - 1, dtype=torch.int32)
    yield "short work", (feats, w, *pools, slots), {"work": short}, "at least"
    yield "float work", (feats, w, *pools, slots), {"work": short.float()}, "int32"


@pytest.mark.parametrize("case", list(_bad_cases(ASRModel(TINY))), ids=lambda c: c[0])
def test_bad_arguments(case) -> None:
    """A clear ValueError, and the pools untouched."""
    _, args, kwargs, message = case
    before = [t.clone() for t in args[2:6]]
    with pytest.raises(ValueError, match=message):
        frame_step(*args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(args[2:6], before, strict=True))


def test_takes_one_frame_of_half_or_full_precision() -> None:
    w = ASRModel(TINY).encoder_weights()
    assert kernels.frame_step.takes(torch.zeros(3, 4, N_MELS), w)
    assert not kernels.frame_step.takes(torch.zeros(3, 8, N_MELS), w)
    assert not kernels.frame_step.takes(torch.zeros(3, 4, N_MELS), ASRModel(TINY).half().encoder_weights())


@torch.inference_mode()
def test_model_chunk_of_one_frame_takes_frame_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """ASRModel.chunk with the model's stacked weights steps one-frame chunks by frame_step (chunks of more frames by
    the Triton front end and the tl.dot form), and equals the PyTorch path over the chained chunks."""
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    model = ASRModel(TINY).eval()
    calls = []
    step = kernels.frame_step.frame_step
    monkeypatch.setattr(kernels.frame_step, "frame_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    slots, weights = torch.tensor([2, 0]), model.encoder_weights()
    fused, plain = model.init_state(3), model.init_state(3)
    feats = 3 * torch.randn(2, 4 * 4, N_MELS) - 8
    bounds = ((0, 4), (4, 12), (12, 16))  # 1, 2 and 1 encoder frames
    out = [model.chunk(feats[:, i:j], fused, slots, impl=Impl.STEP, weights=weights)[0] for i, j in bounds]
    ref = model.chunk(feats, plain, slots, impl=Impl.TORCH)[0]
    assert _rel(torch.cat(out, 1), ref) < 1e-4, f"seed {seed}"
    for mine, theirs in zip(fused.tensors(), plain.tensors(), strict=True):
        assert _rel(mine, theirs) < 1e-4, f"seed {seed}"
    assert len(calls) == 2


def compile_for_hopper() -> None:
    """Compile the one-launch kernel (grid barriers included) for sm_90 at the default model's shapes, bf16."""
    compiled = compile_frame_kernel(kernels.frame_step._frame_kernel, kernels.frame_step._WARPS)
    if "atom.global.gpu.release" not in compiled.asm["ptx"] or not compiled.asm["cubin"]:
        raise RuntimeError("no grid barrier or no cubin")


def test_kernel_compiles_for_hopper() -> None:
    """The interpreter never runs the one-launch form; Triton's compiler must accept it (ptxas comes with Triton).
    Compiled in a subprocess: this one interprets (TRITON_INTERPRET=1)."""
    code = "import tests.test_kernels_frame_step as t; t.compile_for_hopper()"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.raises(ValueError, match="block_p must be one of"):
        compile_frame_kernel(kernels.frame_step._frame_kernel, kernels.frame_step._WARPS, block_p=32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("persistent", [True, False], ids=["one-launch", "phased"])
def test_gpu_default_model(dtype: torch.dtype, b: int, persistent: bool) -> None:
    """The default model's sizes on a pool of 64 slots, compiled, in one launch and phase by phase, three chained
    calls: with a fresh workspace each call, and with one kept across the calls (as a CUDA graph keeps it), which
    each call must leave zeroed, log-probs out."""
    tol = 1.5 if dtype == torch.bfloat16 else 1e-4
    _check(secrets.randbits(32), ModelDimensions(), b, dtype, tol, "cuda", 64, 3, persistent=persistent)
    _check(secrets.randbits(32), ModelDimensions(), b, dtype, tol, "cuda", 64, 3, True, True, persistent=persistent)


@pytest.mark.gpu
@pytest.mark.parametrize(("dims", "b", "block_p"), [(TINY, 3, None), (MASKED, 2, 8), (MASKED, 4, 16)])
def test_gpu_small_shapes(dims: ModelDimensions, b: int, block_p: int | None) -> None:
    """The one launch on the masked and two-group shapes."""
    _check(secrets.randbits(32), dims, b, torch.float32, 1e-4, "cuda", 24, block_p=block_p)


@pytest.mark.gpu
def test_gpu_pad_rows_share_a_spare_slot() -> None:
    """As the CUDA-graph stepper pads a batch: two streams and two pad rows on one spare slot, in one launch. The
    streams' rows match the reference, and no slot but theirs and the spare one changes."""
    seed = secrets.randbits(32)
    model = _model(seed, ModelDimensions(), torch.float32, "cuda")
    w = model.encoder_weights()
    mine = _random_pools(model, seed, "cuda", 8)
    ref, before = tuple(t.clone() for t in mine), tuple(t.clone() for t in mine)
    feats = 3 * torch.randn(4, 4, N_MELS, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)) - 8
    with torch.inference_mode():
        out = frame_step(feats, w, *mine, torch.tensor([5, 1, 7, 7], device="cuda"), check=False)
        expected = frame_step_ref(feats[:2], w, *ref, torch.tensor([5, 1], device="cuda"))
    assert _rel(out[:2], expected) < 1e-4, f"seed {seed}"
    for name, t, theirs, old, front in zip(POOL_NAMES, mine, ref, before, (True, True, False, False), strict=True):
        rows = (lambda a, i: a[i]) if front else (lambda a, i: a[:, i])
        assert _rel(rows(t, [5, 1]), rows(theirs, [5, 1])) < 1e-4, f"{name}, seed {seed}"
        assert torch.equal(rows(t, [0, 2, 3, 4, 6]), rows(old, [0, 2, 3, 4, 6])), f"{name}, seed {seed}"
