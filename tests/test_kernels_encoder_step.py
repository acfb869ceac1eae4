"""The one-launch encoder step (`kernels.encoder_step.encoder_step`) against `encoder_step_ref`, and through
`ASRModel.chunk(..., weights=)`.

CPU tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), which launches it phase
by phase: a spinning grid barrier cannot run there, programs being run one after another.
`test_kernel_compiles_for_hopper` compiles the one-launch form (with its barrier) for sm_90; the gpu-marked tests
run it on a GPU. Every test draws fresh inputs from a random seed and names it in its failure messages.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import fields, replace

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.encoder_step
from asr.model import ASRModel, ModelDimensions
from kernels.encoder_step import EncoderWeights, encoder_step, encoder_step_ref, stacked_pool
from tests.conftest import TINY

POOL = 6
# two groups, head_dim and d_state below the 16-wide tiles (masked); one group, conv width 3
SMALL = ModelDimensions(d_model=32, n_layers=2, d_state=16, head_dim=16, n_groups=1, d_conv=3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; NaN (which fails every bound) if a has NaNs."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(seed: int, dims: ModelDimensions, dtype: torch.dtype, device: str) -> ASRModel:
    """A random model whose every weight (norms, D and biases included) is perturbed away from its init."""
    torch.manual_seed(seed)
    model = ASRModel(dims)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().to(device, dtype)


def _pools(model: ASRModel, seed: int, device: str, pool: int = POOL, copies: int = 2):
    """Equal random state pools (stacked conv and ssm tensors each)."""
    gen = torch.Generator().manual_seed(seed)
    states = [model.init_state(pool, device) for _ in range(copies)]
    for tensors in zip(*(s.tensors() for s in states), strict=True):
        tensors[0].copy_(torch.randn(tensors[0].shape, generator=gen).to(tensors[0].dtype))
        for t in tensors[1:]:
            t.copy_(tensors[0])
    return [
        (stacked_pool([layer.conv for layer in s.layers]), stacked_pool([layer.ssm for layer in s.layers]))
        for s in states
    ]


def _float32(w: EncoderWeights) -> EncoderWeights:
    tensors = {f.name: getattr(w, f.name) for f in fields(w) if f.init}
    return replace(w, **{name: t.float() for name, t in tensors.items() if isinstance(t, torch.Tensor)})


def assert_within(pairs, dtype: torch.dtype, tol: float, what: str) -> None:
    """Each (name, the kernel's, the reference's, float32 math's) within relative error tol: in float32 against the
    reference; in bfloat16 against float32 math, tol times the reference's own distance from it (at least 1e-3),
    since both round in their own places."""
    for name, mine, theirs, exact in pairs:
        bound = tol if dtype == torch.float32 else tol * max(_rel(theirs, exact), 1e-3)
        error = _rel(mine, theirs) if dtype == torch.float32 else _rel(mine, exact)
        assert error < bound, f"{name} {error:.2e} (bound {bound:.2e}), {what}"


def _check(seed: int, dims: ModelDimensions, b: int, l: int, dtype: torch.dtype, tol: float, device: str = "cpu",
           pool: int = POOL, **kwargs) -> None:  # fmt: skip
    """encoder_step (with kwargs) on b streams of l frames against encoder_step_ref on the same random inputs: logits
    and both pools within relative error tol (`assert_within`), the rows outside `slots` untouched."""
    model = _model(seed, dims, dtype, device)
    weights = model.encoder_weights()
    (conv, ssm), (conv_ref, ssm_ref), (conv32, ssm32) = _pools(model, seed, device, pool, copies=3)
    conv32 = conv32.float()
    before = (conv.clone(), ssm.clone())
    gen = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(pool, generator=gen)[:b].to(device)
    what = f"seed {seed}, {dims}, b {b}, l {l}, {dtype}, {kwargs}"
    x = torch.randn(b, l, dims.d_model, generator=gen).to(device, dtype)
    with torch.inference_mode():
        out = encoder_step(x, weights, conv, ssm, slots, **kwargs)
        expected = encoder_step_ref(x, weights, conv_ref, ssm_ref, slots)
        exact32 = encoder_step_ref(x.float(), _float32(weights), conv32, ssm32, slots)
    assert out.shape == (b, l, dims.vocab_size) and out.dtype == dtype, what
    pairs = [("logits", out, expected, exact32), ("ssm state", ssm, ssm_ref, ssm32)]
    assert_within([*pairs, ("conv cache", conv, conv_ref, conv32)], dtype, tol, what)
    others = [s for s in range(pool) if s not in slots.tolist()]
    assert torch.equal(conv[:, others], before[0][:, others]) and torch.equal(ssm[:, others], before[1][:, others])


@pytest.mark.parametrize("dims", [TINY, SMALL], ids=["two-groups", "one-group-k3"])
@pytest.mark.parametrize(("b", "l", "groups"), [(1, 1, 1), (3, 5, 1), (3, 5, 2), (1, 16, 1)])
def test_matches_ref(dims: ModelDimensions, b: int, l: int, groups: int) -> None:
    """Streams in one group (a program steps them one after another) or spread over two (as on a GPU with spare
    SMs; stream b in group b % 2)."""
    _check(secrets.randbits(32), dims, b, l, torch.float32, 1e-5, stream_groups=groups)


@pytest.mark.usefixtures("bf16_as_on_the_gpu")
def test_matches_ref_bf16() -> None:
    _check(secrets.randbits(32), TINY, 2, 3, torch.bfloat16, 1.5)


@torch.inference_mode()
def test_chained_steps_equal_one_step() -> None:
    """Streaming equals offline through the step: 12 frames of two streams as chunks of 1, 4 and 7 give the logits
    and state of one call of 12 frames (within float32 rounding: the accumulators sum in another order)."""
    seed = secrets.randbits(32)
    model = _model(seed, SMALL, torch.float32, "cpu")
    weights = model.encoder_weights()
    (conv, ssm), (conv1, ssm1) = _pools(model, seed, "cpu")
    x = torch.randn(2, 12, SMALL.d_model, generator=torch.Generator().manual_seed(seed))
    slots = torch.tensor([4, 1])
    parts = [encoder_step(x[:, i:j], weights, conv, ssm, slots) for i, j in ((0, 1), (1, 5), (5, 12))]
    whole = encoder_step_ref(x, weights, conv1, ssm1, slots)
    assert _rel(torch.cat(parts, 1), whole) < 1e-5, f"seed {seed}"
    assert _rel(ssm, ssm1) < 1e-5 and _rel(conv, conv1) < 1e-5, f"seed {seed}"


def _bad_cases(model: ASRModel):
    w = model.encoder_weights()
    state = model.init_state(POOL)
    conv, ssm = stacked_pool([s.conv for s in state.layers]), stacked_pool([s.ssm for s in state.layers])
    small = model.init_state(1)
    conv1, ssm1 = stacked_pool([s.conv for s in small.layers]), stacked_pool([s.ssm for s in small.layers])
    x, slots = torch.randn(2, 3, TINY.d_model), torch.tensor([0, 1])
    return {
        "too many rows": ((torch.randn(2, 9, TINY.d_model), w, conv, ssm, slots), "1 <= B L <= 16"),
        "bf16 state": ((x, w, conv, ssm.bfloat16(), slots), "must be float32"),
        "int32 slots": ((x, w, conv, ssm, slots.int()), "slots must be int64"),
        "repeated slot": ((x, w, conv, ssm, torch.tensor([1, 1])), "distinct"),
        "small pool": ((x, w, conv1, ssm1, slots), "must index the pool"),
        "strided pool": ((x, w, conv[:, ::2], ssm[:, ::2], slots[:1]), "must be contiguous"),
        "wrong width": ((torch.randn(2, 3, 16), w, conv, ssm, slots), "does not fit the weights"),
        "float64": ((x.double(), w, conv, ssm, slots), "must be float32, bfloat16 or float16"),
        "head bias": ((x, replace(w, head_bias=w.head_bias[:-1]), conv, ssm, slots), "weights.head_bias"),
    }


def test_bad_stream_groups() -> None:
    model = ASRModel(TINY).eval()
    state = model.init_state(POOL)
    conv, ssm = stacked_pool([s.conv for s in state.layers]), stacked_pool([s.ssm for s in state.layers])
    with pytest.raises(ValueError, match="stream_groups must be in"):
        encoder_step(torch.randn(2, 1, TINY.d_model), model.encoder_weights(), conv, ssm, torch.tensor([0, 1]),
                     stream_groups=3)  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_cases(ASRModel(TINY))))
def test_bad_arguments(case: str) -> None:
    model = ASRModel(TINY).eval()
    args, message = _bad_cases(model)[case]
    before = [t.clone() for t in args[2:4]]
    with pytest.raises(ValueError, match=message):
        encoder_step(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[2:4], before, strict=True)), case


def test_layer_states_must_be_one_tensor() -> None:
    separate = [torch.zeros(POOL, 3), torch.zeros(POOL, 3)]
    with pytest.raises(ValueError, match="consecutive views of one tensor"):
        stacked_pool(separate)
    joined = torch.zeros(2, POOL, 3)
    assert stacked_pool(list(joined)).data_ptr() == joined.data_ptr()


def compile_for_hopper(frames: int) -> None:
    """Compile the one-launch kernel (grid barrier included) for sm_90 at the default model's shapes."""
    kernel = kernels.encoder_step._encoder_step_kernel
    consts = dict(NL=12, D=256, H=8, P=64, N=64, G=1, K=4, L=frames, V=29, BLOCK_R=16, BLOCK_D=256, BLOCK_P=16,
                  BLOCK_N=64, BLOCK_K=4, BLOCK_V=32, PREC="tf32", SYNC=True)  # fmt: skip
    f32 = {"ssm_ptr", "acc_ptr", "sumsq_ptr", "scratch_ptr"}
    signature = {
        n: "constexpr" if n in consts else "*i64" if n == "slots_ptr" else "*i32" if n == "bar_ptr"
        else "*fp32" if n in f32 else "*bf16" if n.endswith("_ptr") else "fp32" if n == "eps" else "i32"
        for n in kernel.arg_names
    }  # fmt: skip
    src = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(c),): v for c, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernels.encoder_step._WARPS})
    if "atom.global.gpu.release" not in compiled.asm["ptx"] or not compiled.asm["cubin"]:
        raise RuntimeError("no grid barrier or no cubin")


@pytest.mark.parametrize("frames", [1, 16])
def test_kernel_compiles_for_hopper(frames: int) -> None:
    """The interpreter never runs the one-launch form; Triton's compiler must accept it (ptxas comes with Triton).
    Compiled in a subprocess: this one interprets (TRITON_INTERPRET=1)."""
    code = f"import tests.test_kernels_encoder_step as t; t.compile_for_hopper({frames})"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "l"), [(1, 1), (1, 8), (4, 4), (16, 1)])
@pytest.mark.parametrize("persistent", [True, False], ids=["one-launch", "phased"])
def test_gpu_default_model(dtype: torch.dtype, b: int, l: int, persistent: bool) -> None:
    """The default model's sizes on a pool of 64 slots, compiled, in one launch and phase by phase."""
    tol = 1.5 if dtype == torch.bfloat16 else 1e-4
    _check(secrets.randbits(32), ModelDimensions(), b, l, dtype, tol, device="cuda", pool=64, persistent=persistent)


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [TINY, SMALL], ids=["two-groups", "one-group-k3"])
@pytest.mark.parametrize(("b", "l", "groups"), [(3, 5, 1), (3, 5, 3), (4, 4, 2), (16, 1, 4)])
def test_gpu_small_shapes(dims: ModelDimensions, b: int, l: int, groups: int) -> None:
    """The one launch on the masked and two-group shapes, with streams in one group or spread over several."""
    _check(secrets.randbits(32), dims, b, l, torch.float32, 1e-4, device="cuda", pool=24, stream_groups=groups)


@pytest.mark.gpu
def test_gpu_pad_rows_share_a_spare_slot() -> None:
    """As the CUDA-graph stepper pads a batch: two streams and two pad rows on one spare slot, in one launch of two
    frames. The streams' rows match the reference, and no slot but theirs and the spare one changes."""
    seed = secrets.randbits(32)
    model = _model(seed, ModelDimensions(), torch.float32, "cuda")
    weights = model.encoder_weights()
    (conv, ssm), (conv_ref, ssm_ref) = _pools(model, seed, "cuda", pool=8)
    before = (conv.clone(), ssm.clone())
    x = torch.randn(4, 2, model.dims.d_model, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    with torch.inference_mode():
        out = encoder_step(x, weights, conv, ssm, torch.tensor([5, 1, 7, 7], device="cuda"), check=False)
        ref = encoder_step_ref(x[:2], weights, conv_ref, ssm_ref, torch.tensor([5, 1], device="cuda"))
    assert _rel(out[:2], ref) < 1e-4, f"seed {seed}"
    for mine, theirs, old in ((conv, conv_ref, before[0]), (ssm, ssm_ref, before[1])):
        assert _rel(mine[:, [5, 1]], theirs[:, [5, 1]]) < 1e-4, f"seed {seed}"
        assert torch.equal(mine[:, [0, 2, 3, 4, 6]], old[:, [0, 2, 3, 4, 6]]), f"seed {seed}"
