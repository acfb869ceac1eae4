"""The one-frame encoder step (`kernels.frame_step.frame_step`) against `frame_step_ref`, and through
`ASRModel.chunk(..., weights=)`.

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

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.frame_step
from asr.features import N_MELS
from asr.model import ASRModel, Impl, ModelDimensions
from kernels.encoder_step import stacked_pool
from kernels.frame_step import frame_step, frame_step_ref
from tests.conftest import TINY
from tests.test_kernels_encoder_step import SMALL, _rel, pad_rows_share_a_spare_slot
from tests.test_kernels_encoder_step import _check as check_step

# every tile masked: d_model / 2, head_dim and d_state below their powers of two; two heads a group, conv width 3
MASKED = ModelDimensions(d_model=24, n_layers=2, d_state=12, head_dim=12, n_groups=2, d_conv=3, frontend_channels=4)
POOL = 6


def _check(seed: int, dims: ModelDimensions, b: int, dtype: torch.dtype, tol: float, device: str = "cpu",
           pool: int = POOL, calls: int = 2, **kwargs) -> None:  # fmt: skip
    """`calls` chained one-frame steps of frame_step on b streams against frame_step_ref: logits and both pools, the
    rows outside the slots untouched (the check of `tests/test_kernels_encoder_step.py`)."""
    check_step(seed, dims, b, 1, dtype, tol, device, pool, calls, frame_step, frame_step_ref, **kwargs)


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


def _bad_cases(model: ASRModel):
    w = model.encoder_weights()
    state = model.init_state(POOL)
    conv, ssm = stacked_pool([s.conv for s in state.layers]), stacked_pool([s.ssm for s in state.layers])
    x = torch.randn(2, 1, model.dims.d_model)
    slots = torch.tensor([0, 1])
    yield "two frames", (x.repeat(1, 2, 1), w, conv, ssm, slots), {}, "one frame a stream"
    half = ASRModel(model.dims).to(torch.float16)
    state16 = half.init_state(POOL)
    conv16 = stacked_pool([s.conv for s in state16.layers])
    ssm16 = stacked_pool([s.ssm for s in state16.layers])
    yield "float16", (x.half(), half.encoder_weights(), conv16, ssm16, slots), {}, "float32 or bfloat16"
    yield "block_p", (x, w, conv, ssm, slots), {"block_p": 6}, "power of two"
    yield "slots", (x, w, conv, ssm, torch.tensor([1, 1])), {}, "distinct"


@pytest.mark.parametrize("case", list(_bad_cases(ASRModel(TINY))), ids=lambda c: c[0])
def test_bad_arguments(case) -> None:
    """A clear ValueError, and the pools untouched."""
    _, args, kwargs, message = case
    before = [args[2].clone(), args[3].clone()]
    with pytest.raises(ValueError, match=message):
        frame_step(*args, **kwargs)
    assert torch.equal(args[2], before[0]) and torch.equal(args[3], before[1])


def test_takes_one_frame_of_half_or_full_precision() -> None:
    model = ASRModel(TINY)
    w = model.encoder_weights()
    assert kernels.frame_step.takes(torch.zeros(3, 1, 32), w)
    assert not kernels.frame_step.takes(torch.zeros(3, 2, 32), w)
    assert not kernels.frame_step.takes(torch.zeros(3, 1, 32, dtype=torch.float16), w)


@torch.inference_mode()
def test_model_chunk_of_one_frame_takes_frame_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """ASRModel.chunk with the model's stacked weights steps one-frame chunks by frame_step (chunks of more frames by
    the tl.dot form), and equals the PyTorch path over the chained chunks."""
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    model = ASRModel(TINY).eval()
    calls = []
    step = kernels.frame_step.frame_step
    monkeypatch.setattr(kernels.frame_step, "frame_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    slots, weights = torch.tensor([2, 0]), model.encoder_weights()
    fused, plain = model.init_state(3), model.init_state(3)
    feats = torch.randn(2, 4 * 4, N_MELS)
    bounds = ((0, 4), (4, 12), (12, 16))  # 1, 2 and 1 encoder frames
    out = [model.chunk(feats[:, i:j], fused, slots, impl=Impl.STEP, weights=weights)[0] for i, j in bounds]
    ref = model.chunk(feats, plain, slots, impl=Impl.TORCH)[0]
    assert _rel(torch.cat(out, 1), ref) < 1e-4, f"seed {seed}"
    for mine, theirs in zip(fused.layers, plain.layers, strict=True):
        assert _rel(mine.ssm, theirs.ssm) < 1e-4 and _rel(mine.conv, theirs.conv) < 1e-4, f"seed {seed}"
    assert len(calls) == 2


def compile_for_hopper() -> None:
    """Compile the one-launch kernel (grid barriers included) for sm_90 at the default model's shapes, bf16."""
    kernel = kernels.frame_step._frame_kernel
    consts = dict(NL=12, D=256, H=8, P=64, N=64, G=1, K=4, V=29, BLOCK_J=128, BLOCK_P=4, BLOCK_N=64, BLOCK_K=4,
                  BLOCK_V=32, SYNC=True)  # fmt: skip
    pairs = {"in_ptr", "outw_ptr", "hw_ptr"}
    signature = {
        n: "constexpr" if n in consts else "*i64" if n == "slots_ptr" else "*i32" if n in pairs | {"bar_ptr"}
        else "*fp32" if n in {"ssm_ptr", "acc_ptr"} else "*bf16" if n.endswith("_ptr") else "fp32" if n == "eps"
        else "i32"
        for n in kernel.arg_names
    }  # fmt: skip
    src = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(c),): v for c, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernels.frame_step._WARPS})
    if "atom.global.gpu.release" not in compiled.asm["ptx"] or not compiled.asm["cubin"]:
        raise RuntimeError("no grid barrier or no cubin")


def test_kernel_compiles_for_hopper() -> None:
    """The interpreter never runs the one-launch form; Triton's compiler must accept it (ptxas comes with Triton).
    Compiled in a subprocess: this one interprets (TRITON_INTERPRET=1)."""
    code = "import tests.test_kernels_frame_step as t; t.compile_for_hopper()"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("persistent", [True, False], ids=["one-launch", "phased"])
def test_gpu_default_model(dtype: torch.dtype, b: int, persistent: bool) -> None:
    """The default model's sizes on a pool of 64 slots, compiled, in one launch and phase by phase, three chained
    calls (the accumulators and barriers are fresh each call)."""
    tol = 1.5 if dtype == torch.bfloat16 else 1e-4
    _check(secrets.randbits(32), ModelDimensions(), b, dtype, tol, "cuda", 64, 3, persistent=persistent)


@pytest.mark.gpu
@pytest.mark.parametrize(("dims", "b", "block_p"), [(TINY, 3, None), (MASKED, 2, 8), (MASKED, 4, 16)])
def test_gpu_small_shapes(dims: ModelDimensions, b: int, block_p: int | None) -> None:
    """The one launch on the masked and two-group shapes."""
    _check(secrets.randbits(32), dims, b, torch.float32, 1e-4, "cuda", 24, block_p=block_p)


@pytest.mark.gpu
def test_gpu_pad_rows_share_a_spare_slot() -> None:
    pad_rows_share_a_spare_slot(frame_step, frames=1)
