"""The Triton front-end step (`kernels.frontend.frontend_step`) against `frontend_step_ref`, and `frontend_step_ref`
against the model's own front end (`ASRModel._normalize` + `Subsampling.chunk`).

CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) at small shapes (16 mels,
8 channels); `test_kernels_compile_for_hopper` compiles them for sm_90 at the default model's shapes. Every test
draws fresh inputs from a random seed and names it in its failure messages.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.frontend
from asr.features import CMVN
from asr.model import ASRModel, ModelDimensions
from asr.ssm import halved
from kernels.frontend import frontend_step, frontend_step_ref

POOL = 7  # slots in the pool


pytestmark = pytest.mark.usefixtures("bf16_as_on_the_gpu")


@dataclass(frozen=True)
class Dims:
    mels: int = 16
    channels: int = 8
    d_model: int = 40  # two Linear column tiles when the grid is sized for many SMs


def _weights(seed: int, s: Dims, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """frontend_step's weight arguments, scaled to keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed + 1)
    c, k = s.channels, s.channels * halved(halved(s.mels))
    weights = dict(
        conv1_weight=torch.randn(c, 1, 3, 3, generator=gen) / 2,
        conv1_bias=torch.randn(c, generator=gen) / 10,
        conv2_weight=torch.randn(c, c, 3, 3, generator=gen) / (3 * c**0.5),
        conv2_bias=torch.randn(c, generator=gen) / 10,
        out_weight=torch.randn(s.d_model, k, generator=gen) / k**0.5,
        out_bias=torch.randn(s.d_model, generator=gen) / 10,
    )
    return {name: w.to(dtype) for name, w in weights.items()}


def _inputs(seed: int, s: Dims, b: int, l: int, dtype: torch.dtype, pool: int = POOL) -> dict[str, torch.Tensor]:
    """feats (b, 4 l, mels), random CMVN, random cache pools in dtype and b distinct random slots."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        feats=torch.randn(b, 4 * l, s.mels, generator=gen) * 2 - 3,
        conv1_cache=torch.randn(pool, 1, 1, s.mels, generator=gen).to(dtype),
        conv2_cache=torch.randn(pool, s.channels, 1, halved(s.mels), generator=gen).to(dtype),
        slots=torch.randperm(pool, generator=gen)[:b],
        cmvn_mean=torch.randn(s.mels, generator=gen) - 3,
        cmvn_istd=torch.rand(s.mels, generator=gen) + 0.5,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; NaN (which fails every bound) if a has NaNs."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def sms(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The SM count the launch plan sees: 1 runs one conv program per stream and wide Linear tiles; 132 (an H200)
    splits each stream over conv programs by channel block and (past 8 frames at 16 mels) by frame block, and the
    Linear over narrow tiles."""
    monkeypatch.setattr(kernels.frontend, "_sm_count", lambda _device: request.param)
    return request.param


def _check(seed: int, s: Dims, b: int, l: int, dtype: torch.dtype, tol: float) -> None:
    """frontend_step and frontend_step_ref on copies of one pool: the output, the stepped rows and the rest."""
    args = _inputs(seed, s, b, l, dtype)
    weights = _weights(seed, s, dtype)
    pools = {name: args[name] for name in ("conv1_cache", "conv2_cache")}
    kernel_args, ref_args = dict(args), dict(args)
    for name, pool in pools.items():
        kernel_args[name], ref_args[name] = pool.clone(), pool.clone()
    y = frontend_step(**kernel_args, **weights)
    y_ref = frontend_step_ref(**ref_args, **weights)
    assert y.dtype == dtype and y.shape == (b, l, s.d_model), f"seed {seed}: y {y.dtype} {tuple(y.shape)}"
    slots = args["slots"]
    errors = {
        "y": _rel(y, y_ref),
        "conv2_cache": _rel(kernel_args["conv2_cache"][slots], ref_args["conv2_cache"][slots]),
    }
    for name, err in errors.items():
        assert err < tol, f"seed {seed}: {name} relative error {err:.2e} >= {tol:.0e} (all: {errors})"
    assert torch.equal(kernel_args["conv1_cache"], ref_args["conv1_cache"]), f"seed {seed}: conv1 cache rows differ"
    others = torch.tensor([i for i in range(POOL) if i not in slots.tolist()], dtype=torch.long)
    for name, pool in pools.items():
        assert torch.equal(kernel_args[name][others], pool[others]), f"seed {seed}: {name} rows outside slots changed"


@pytest.mark.parametrize("sms", [1, 132], indirect=True)
@pytest.mark.parametrize(("b", "l"), [(1, 1), (3, 4), (2, 16)])
def test_matches_ref(sms: int, b: int, l: int) -> None:
    _check(secrets.randbits(32), Dims(), b, l, torch.float32, 1e-5)


@pytest.mark.parametrize("sms", [1, 132], indirect=True)
def test_matches_ref_bf16(sms: int) -> None:
    """bf16 weights and caches; the interpreter's bf16 is patched to round as the GPU does (bf16_as_on_the_gpu),
    so only the order of the float32 sums differs from PyTorch's."""
    _check(secrets.randbits(32), Dims(), 3, 3, torch.bfloat16, 1e-2)


@pytest.mark.parametrize("sms", [1], indirect=True)
def test_odd_sizes(sms: int) -> None:
    """Odd mels (17 -> 9 -> 5), channels and d_model (masked lanes and pad columns everywhere), and more Linear rows
    than one tile holds (5 streams x 16 frames)."""
    _check(secrets.randbits(32), Dims(mels=17, channels=5, d_model=20), 5, 16, torch.float32, 1e-5)


@pytest.mark.parametrize("sms", [132], indirect=True)
def test_frame_blocks(sms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv programs of 2 frames each (as the default model's 80 mels get on an idle GPU), the last one partial, and
    one conv1 row per tl.dot."""
    monkeypatch.setattr(kernels.frontend, "_TILE", 16)
    monkeypatch.setattr(kernels.frontend, "_CONV1_ROWS", 1)
    _check(secrets.randbits(32), Dims(), 2, 5, torch.float32, 1e-5)


@pytest.mark.parametrize("sms", [1], indirect=True)
def test_strided_slots(sms: int) -> None:
    """A non-contiguous slots view (every other entry of a longer tensor) steps exactly the rows it names."""
    seed, s = secrets.randbits(32), Dims()
    args, weights = _inputs(seed, s, 3, 2, torch.float32), _weights(seed, s, torch.float32)
    unused = next(i for i in range(POOL) if i not in args["slots"].tolist())  # interleaved: a row it must not touch
    args["slots"] = torch.stack([args["slots"], torch.full_like(args["slots"], unused)], dim=1).flatten()[::2]
    assert not args["slots"].is_contiguous()
    mine = {name: args[name].clone() for name in ("conv1_cache", "conv2_cache")}
    ref = {name: args[name].clone() for name in ("conv1_cache", "conv2_cache")}
    y = frontend_step(**{**args, **mine}, **weights)
    y_ref = frontend_step_ref(**{**args, **ref}, **weights)
    assert _rel(y, y_ref) < 1e-5, f"seed {seed}: output differs"
    for name in mine:
        assert _rel(mine[name], ref[name]) < 1e-5, f"seed {seed}: {name} pool differs (rows outside slots?)"


@pytest.mark.parametrize("sms", [132], indirect=True)
def test_chained_calls_equal_one_call(sms: int) -> None:
    """Calls of random lengths on the pool equal one frontend_step_ref over all their frames."""
    seed = secrets.randbits(32)
    s, b = Dims(), 3
    lengths = torch.randint(1, 5, (3,), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    args, weights = _inputs(seed, s, b, sum(lengths), torch.float32), _weights(seed, s, torch.float32)
    pools = {name: args[name].clone() for name in ("conv1_cache", "conv2_cache")}
    parts = args["feats"].split([4 * n for n in lengths], dim=1)
    ys = [frontend_step(**{**args, **pools, "feats": part}, **weights) for part in parts]
    y_ref = frontend_step_ref(**args, **weights)
    errors = {"y": _rel(torch.cat(ys, dim=1), y_ref), "conv2_cache": _rel(pools["conv2_cache"], args["conv2_cache"])}
    for name, err in errors.items():
        assert err < 1e-5, f"seed {seed}, lengths {lengths}: {name} relative error {err:.2e} (all: {errors})"
    assert torch.equal(pools["conv1_cache"], args["conv1_cache"]), f"seed {seed}, lengths {lengths}: conv1 cache"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_model(dtype: torch.dtype) -> None:
    """frontend_step_ref on pool rows == the model's CMVN + Subsampling.chunk on an EncoderState pool, bit for bit
    (a bf16 model keeps its CMVN buffers in bf16; the step takes them as they are)."""
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    model = ASRModel(ModelDimensions(d_model=32, n_layers=1, d_state=8, head_dim=8, frontend_channels=4))
    model.set_cmvn(CMVN(torch.randn(model.dims.n_mels) - 3, torch.rand(model.dims.n_mels) + 0.5))
    model = model.to(dtype)
    b, l = 3, 5
    feats = torch.randn(b, 4 * l, model.dims.n_mels) * 2 - 3
    slots = torch.randperm(POOL)[:b]
    state = model.init_state(POOL).frontend
    for pool in (state.conv1, state.conv2):
        pool.copy_(torch.randn(pool.shape))
    conv1, conv2 = state.conv1.clone(), state.conv2.clone()
    sub = model.frontend
    with torch.no_grad():
        y, _ = sub.chunk(model._normalize(feats).to(dtype), state, slots)
        y_ref = frontend_step_ref(
            feats, conv1, conv2, slots, model.cmvn_mean, model.cmvn_istd, sub.conv1.weight, sub.conv1.bias,
            sub.conv2.weight, sub.conv2.bias, sub.out.weight, sub.out.bias,
        )  # fmt: skip
    assert torch.equal(y_ref, y), f"seed {seed}: outputs differ (relative error {_rel(y_ref, y):.1e})"
    assert torch.equal(conv1, state.conv1) and torch.equal(conv2, state.conv2), f"seed {seed}: cache pools differ"


def _bad_cases(s: Dims) -> list[tuple[str, object, str]]:
    """(description, mutate(args) -> args, expected message fragment) for the argument checks."""
    return [
        ("2-d feats", lambda a: dict(a, feats=a["feats"][0]), "feats must be (B, 4 L, n_mels)"),
        ("6 feature frames", lambda a: dict(a, feats=torch.randn(2, 6, s.mels)), "feats must be (B, 4 L, n_mels)"),
        ("no streams", lambda a: dict(a, feats=a["feats"][:0], slots=a["slots"][:0]), "B, L >= 1"),
        ("17 frames", lambda a: dict(a, feats=torch.randn(2, 68, s.mels)), "1 to 16 output frames"),
        ("wrong mels", lambda a: dict(a, feats=a["feats"][..., 1:]), "cmvn_mean must have shape (15,)"),
        ("float64 feats", lambda a: dict(a, feats=a["feats"].double()), "feats must be float32"),
        ("int cmvn", lambda a: dict(a, cmvn_istd=a["cmvn_istd"].int()), "cmvn_istd must be float32, bfloat16"),
        ("conv2 weight", lambda a: dict(a, conv2_weight=a["conv2_weight"][:, :-1]), "conv2_weight must have shape"),
        ("5x5 conv1", lambda a: dict(a, conv1_weight=torch.randn(s.channels, 1, 5, 5)), "conv1_weight must have"),
        ("Linear width", lambda a: dict(a, out_weight=a["out_weight"][:, 1:]), "out_weight must have shape"),
        ("out bias", lambda a: dict(a, out_bias=a["out_bias"][1:]), "out_bias must have shape"),
        ("short pool", lambda a: dict(a, conv2_cache=a["conv2_cache"][:-1]), "conv1_cache and conv2_cache must be"),
        ("bf16 cache", lambda a: dict(a, conv1_cache=a["conv1_cache"].bfloat16()), "conv1_cache must have out_weight"),
        ("bf16 bias", lambda a: dict(a, conv2_bias=a["conv2_bias"].bfloat16()), "conv2_bias must have out_weight"),
        (
            "float64 model",
            lambda a: {k: v.double() if "weight" in k or "bias" in k else v for k, v in a.items()},
            "the weights must be float32, bfloat16 or float16",
        ),
        (
            "strided cache",
            lambda a: dict(a, conv2_cache=a["conv2_cache"].transpose(0, 1).contiguous().transpose(0, 1)),
            "must be contiguous",
        ),
        ("slot out of range", lambda a: dict(a, slots=torch.tensor([0, POOL])), "must index the pool"),
        ("repeated slot", lambda a: dict(a, slots=torch.tensor([2, 2])), "slots must be distinct"),
        ("int32 slots", lambda a: dict(a, slots=a["slots"].int()), "slots must be int64"),
        ("slots for 3 streams", lambda a: dict(a, slots=torch.tensor([0, 1, 2])), "slots must be int64 of shape (2,)"),
    ]


BAD = Dims()


@pytest.mark.parametrize(("name", "mutate", "message"), _bad_cases(BAD), ids=[c[0] for c in _bad_cases(BAD)])
def test_bad_arguments(name: str, mutate, message: str) -> None:
    seed = secrets.randbits(32)
    bad = mutate({**_inputs(seed, BAD, 2, 1, torch.float32), **_weights(seed, BAD, torch.float32)})
    before = (bad["conv1_cache"].clone(), bad["conv2_cache"].clone())
    with pytest.raises(ValueError, match=re.escape(message)):
        frontend_step(**bad)
    assert torch.equal(bad["conv1_cache"], before[0]) and torch.equal(bad["conv2_cache"], before[1]), name


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    seed = secrets.randbits(32)
    with pytest.raises(ValueError, match=re.escape("frontend_step needs CUDA tensors (or TRITON_INTERPRET=1)")):
        frontend_step(**_inputs(seed, BAD, 2, 1, torch.float32), **_weights(seed, BAD, torch.float32))


def _compile(kernel, consts: dict, ty: str, ints: dict[str, int]) -> str:
    """Compile one kernel for sm_90 with these constexprs (and num_warps), pointer type ty for the model's tensors,
    the integer arguments of `ints` divisible by 16 marked so (as a launch specializes them); returns ptxas's log
    (with TRITON_DUMP_PTXAS_LOG=1)."""
    options = {k: v for k, v in consts.items() if k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in consts.items() if k not in options}
    names = kernel.arg_names
    signature = {
        n: "constexpr" if n in constexprs else "*i64" if n == "slots_ptr"
        else "*fp32" if n in ("feats_ptr", "mean_ptr", "istd_ptr") else f"*{ty}" if n.endswith("_ptr") else "i32"
        for n in names
    }  # fmt: skip
    aligned = [n for n in names if n.endswith("_ptr") or ints.get(n, 1) % 16 == 0]
    src = ASTSource(
        kernel,
        signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    with contextlib.redirect_stdout(io.StringIO()) as log:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    if not compiled.asm["cubin"]:
        raise RuntimeError(f"{kernel.fn.__name__}: no cubin")
    return log.getvalue()


def compile_for_hopper(frames: int) -> None:
    """Compile both kernels for sm_90 at the default model's shapes (80 mels, 64 channels, d_model 256), with the
    launch plans of 1 and 1,024 streams on an H200 (132 SMs), bf16 and float32 (run with TRITON_INTERPRET=0 and
    TRITON_DUMP_PTXAS_LOG=1). Prints each kernel's registers and spills; raises if a bf16 one spills."""
    m, c, d = 80, 64, 256
    for b, dtype in ((1, torch.bfloat16), (1024, torch.bfloat16), (1, torch.float32)):
        p = kernels.frontend.plan(b, frames, m, c, d, dtype, 132)
        ints = dict(M=m, C=c, D=d, K=c * halved(halved(m)), R=b * frames, co_size=p.co_size, n_co=p.n_co)
        ty = "bf16" if dtype == torch.bfloat16 else "fp32"
        for kernel, consts in ((kernels.frontend._conv_kernel, p.conv), (kernels.frontend._linear_kernel, p.linear)):
            log = _compile(kernel, consts, ty, ints)
            regs, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
            print(f"{kernel.fn.__name__} {ty} B={b} L={frames}: {regs[1]} registers, {spills[1]} bytes spill stores")
            if ty == "bf16" and spills[1] != "0":
                raise RuntimeError(f"{kernel.fn.__name__} spills registers:\n{log}")


@pytest.mark.parametrize("frames", [1, 8])
def test_kernels_compile_for_hopper(frames: int, tmp_path: Path) -> None:
    """Both kernels compile for sm_90 (no GPU needed; ptxas comes with Triton), and the bf16 ones spill no
    registers. The interpreter runs the kernels as Python and misses what only Triton's compiler rejects. Compiled
    in a subprocess (this one interprets, TRITON_INTERPRET=1) with an empty cache, so that ptxas runs and logs."""
    code = f"import tests.test_kernels_frontend as t; t.compile_for_hopper({frames})"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "l"), [(1, 1), (1, 8), (64, 4), (1024, 8)])
def test_gpu_model_shapes(dtype: torch.dtype, b: int, l: int) -> None:
    """The default model's sizes (80 mels, 64 channels, d_model 256), compiled, on a pool of b + 8 slots: the
    output and the stepped cache rows against frontend_step_ref, the other rows untouched."""
    seed, s, pool = secrets.randbits(32), Dims(mels=80, channels=64, d_model=256), b + 8
    args = {k: v.cuda() for k, v in _inputs(seed, s, b, l, dtype, pool).items()}
    weights = {k: v.cuda() for k, v in _weights(seed, s, dtype).items()}
    caches = {name: args[name] for name in ("conv1_cache", "conv2_cache")}
    mine = {name: t.clone() for name, t in caches.items()}
    ref = {name: t.clone() for name, t in caches.items()}
    y = frontend_step(**{**args, **mine}, **weights)
    y_ref = frontend_step_ref(**{**args, **ref}, **weights)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3  # PyTorch's cuDNN convs may run in TF32
    errors = {name: _rel(mine[name], ref[name]) for name in mine} | {"y": _rel(y, y_ref)}
    for name, err in errors.items():
        assert err < tol, f"seed {seed}: {name} relative error {err:.2e} >= {tol:.0e} (all: {errors})"
    others = torch.tensor([i for i in range(pool) if i not in args["slots"].tolist()], device="cuda")
    for name, t in caches.items():
        assert torch.equal(mine[name][others], t[others]), f"seed {seed}: {name} rows outside slots changed"
