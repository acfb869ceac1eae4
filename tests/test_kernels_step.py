"""The Triton streaming step (`kernels.step.step`) against `step_ref`, and `step_ref` against `Mamba2Mixer._run`.

CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) at small shapes; the
gpu-marked tests run the compiled kernels at the default model's shapes. Every test draws fresh inputs from a random
seed and names it in its failure messages.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.step
from asr.model import ASRModel, Impl, MambaLayerState, ModelDimensions
from kernels.step import step, step_ref

POOL = 6  # slots in the pool


@dataclass(frozen=True)
class Shapes:
    heads: int = 4
    head_dim: int = 16
    d_state: int = 16
    n_groups: int = 1
    d_conv: int = 4

    @property
    def d_inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return self.d_inner + self.conv_dim + self.heads


def _pool(seed: int, s: Shapes, dtype=torch.float32, device="cpu", pool: int = POOL):
    """A random pool: conv_cache (pool, conv_dim, K - 1) in dtype, ssm_state (pool, H, P, N) float32."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.randn(pool, s.conv_dim, s.d_conv - 1, generator=gen).to(dtype)
    ssm = torch.randn(pool, s.heads, s.head_dim, s.d_state, generator=gen)
    return conv.to(device), ssm.to(device)


def _params(seed: int, s: Shapes, dtype=torch.float32, device="cpu") -> dict:
    """The layer's parameters as step() takes them (conv and norm weights in dtype, the per-head ones float32)."""
    gen = torch.Generator().manual_seed(seed + 1)
    params = dict(
        conv_weight=(torch.randn(s.conv_dim, s.d_conv, generator=gen) * 0.5).to(dtype),
        conv_bias=(torch.randn(s.conv_dim, generator=gen) * 0.1).to(dtype),
        dt_bias=torch.randn(s.heads, generator=gen) - 2,
        A_log=torch.rand(s.heads, generator=gen) * 2,
        D=torch.randn(s.heads, generator=gen),
        norm_weight=(1 + 0.3 * torch.randn(s.d_inner, generator=gen)).to(dtype),
    )
    params = {k: v.to(device) for k, v in params.items()}
    return dict(params, n_groups=s.n_groups, head_dim=s.head_dim)


def _frames(seed: int, s: Shapes, b: int, l: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """zxbcdt (b, l, d_in_proj)."""
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.randn(b, l, s.d_in_proj, generator=gen).to(dtype).to(device)


def _slots(seed: int, b: int, device="cpu", pool: int = POOL) -> torch.Tensor:
    """b distinct random slots of the pool, in random order."""
    return torch.randperm(pool, generator=torch.Generator().manual_seed(seed + 3))[:b].to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; NaN (which fails every bound) if a has NaNs."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_step(seed, s: Shapes, b: int, l: int, dtype, tol: float, device="cpu", pool: int = POOL) -> None:
    """step() and step_ref() on copies of one pool: y, the stepped rows and the untouched rest."""
    conv, ssm = _pool(seed, s, dtype, device, pool)
    params = _params(seed, s, dtype, device)
    zx, slots = _frames(seed, s, b, l, dtype, device), _slots(seed, b, device, pool)
    conv_k, ssm_k, conv_r, ssm_r = conv.clone(), ssm.clone(), conv.clone(), ssm.clone()
    y = step(zx, conv_k, ssm_k, slots, **params)
    y_ref = step_ref(zx, conv_r, ssm_r, slots, **params)
    assert y.dtype == zx.dtype and y.shape == (b, l, s.d_inner), f"seed {seed}: y {y.dtype} {tuple(y.shape)}"
    assert ssm_k.dtype == torch.float32
    errors = {"y": _rel(y, y_ref), "ssm_state": _rel(ssm_k[slots], ssm_r[slots])}
    for name, err in errors.items():
        assert err < tol, f"seed {seed}: {name} relative error {err:.2e} >= {tol:.0e} (all: {errors})"
    assert torch.equal(conv_k[slots], conv_r[slots]), f"seed {seed}: conv cache rows differ from step_ref's"
    others = torch.tensor([i for i in range(pool) if i not in slots.tolist()], dtype=torch.long, device=device)
    assert torch.equal(conv_k[others], conv[others]), f"seed {seed}: conv cache rows outside slots changed"
    assert torch.equal(ssm_k[others], ssm[others]), f"seed {seed}: ssm state rows outside slots changed"


class _Counting:
    """A kernel that records the grid of each launch."""

    def __init__(self, kernel, grids: list) -> None:
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize(("b", "l"), [(1, 1), (3, 3), (3, 16)])
def test_matches_ref(n_groups: int, b: int, l: int) -> None:
    _check_step(secrets.randbits(32), Shapes(n_groups=n_groups), b, l, torch.float32, 1e-4)


@pytest.mark.parametrize("l", [1, 5])
def test_matches_ref_bf16(l: int) -> None:
    """bf16 frames and conv cache (the state stays float32); the reference rounds its conv output to bf16."""
    _check_step(secrets.randbits(32), Shapes(n_groups=2), 3, l, torch.bfloat16, 2e-2)


@pytest.mark.parametrize(
    ("dtype", "l", "rows", "programs"),
    [(torch.bfloat16, 16, 32, 5), (torch.float16, 8, 16, 1), (torch.bfloat16, 9, 32, 0), (torch.bfloat16, 8, 64, 64)],
)
def test_chunked_form(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, l: int, rows: int, programs: int) -> None:
    """A half-precision step of `_SSD_MIN_FRAMES` frames or more takes `_step_ssd_kernel` (the SSM as one chunk of
    tl.dots; "ieee" dots in the interpreter), head_dim 64 split into 64 / rows tiles a head; `programs` persistent
    programs (an SM in the interpreter) take the 3 streams x 2 heads x 64 / rows tiles in turn, or (0) one each."""
    monkeypatch.setattr(kernels.step, "_SSD_ROWS", rows)
    monkeypatch.setattr(kernels.step, "_SSD_PROGRAMS_PER_SM", programs)
    launched = []
    ssd = kernels.step._step_ssd_kernel
    monkeypatch.setattr(kernels.step, "_step_ssd_kernel", _Counting(ssd, launched))
    _check_step(secrets.randbits(32), Shapes(heads=2, head_dim=64, n_groups=2), 3, l, dtype, 2e-2)
    tiles = 3 * 2 * 64 // rows
    assert launched == [(min(tiles, programs or tiles),)], launched


def test_chunked_form_odd_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked form at every frame count from 1 (forced) with head_dim, d_state and conv width that are not
    powers of two (tl.dot's tiles padded to 16), and several groups."""
    monkeypatch.setattr(kernels.step, "_SSD_MIN_FRAMES", 1)
    launched = []
    monkeypatch.setattr(kernels.step, "_step_ssd_kernel", _Counting(kernels.step._step_ssd_kernel, launched))
    for l in (1, 2, 3, 5):
        _check_step(secrets.randbits(32), Shapes(heads=3, head_dim=12, d_state=10, n_groups=3, d_conv=3), 2, l,
                    torch.bfloat16, 2e-2)  # fmt: skip
    assert launched == [(min(6, kernels.step._SSD_PROGRAMS_PER_SM),)] * 4, launched  # 2 streams x 3 heads


def test_odd_sizes() -> None:
    """head_dim, d_state and conv width that are not powers of two (masked lanes)."""
    _check_step(
        secrets.randbits(32), Shapes(heads=3, head_dim=12, d_state=10, n_groups=3, d_conv=3), 2, 4, torch.float32, 1e-4
    )


@pytest.mark.parametrize(("conv_block", "scan_rows"), [(32, 8), (16, 4)])
def test_several_blocks(monkeypatch: pytest.MonkeyPatch, conv_block: int, scan_rows: int) -> None:
    """Conv channels and state rows split over several programs (the default model's shapes always do this on
    the GPU), including a last block that is only partly inside (head_dim 12, conv_dim 44)."""
    monkeypatch.setattr(kernels.step, "_CONV_BLOCK", conv_block)
    monkeypatch.setattr(kernels.step, "_SCAN_ROWS", scan_rows)
    seed = secrets.randbits(32)
    _check_step(seed, Shapes(n_groups=2), 3, 5, torch.float32, 1e-4)
    _check_step(seed, Shapes(heads=3, head_dim=12, d_state=4, n_groups=1), 2, 2, torch.float32, 1e-4)


def test_strided_slots() -> None:
    """A non-contiguous slots view (every other entry of a longer tensor) steps exactly the rows it names."""
    seed, s, b = secrets.randbits(32), Shapes(), 2
    conv, ssm = _pool(seed, s)
    params, zx = _params(seed, s), _frames(seed, s, b, 3)
    named = _slots(seed, b)
    unused = next(i for i in range(POOL) if i not in named.tolist())  # interleaved: a row it must not touch
    slots = torch.stack([named, torch.full((b,), unused)], dim=1).flatten()[::2]
    assert not slots.is_contiguous()
    conv_k, ssm_k = conv.clone(), ssm.clone()
    y = step(zx, conv_k, ssm_k, slots, **params)
    y_ref = step_ref(zx, conv, ssm, slots, **params)
    errors = {"y": _rel(y, y_ref), "ssm_state": _rel(ssm_k, ssm), "conv": _rel(conv_k, conv)}
    for name, err in errors.items():
        assert err < 1e-4, f"seed {seed}: {name} relative error {err:.2e} (all: {errors})"


def test_chained_steps_equal_one_step() -> None:
    """Steps of random lengths on the pool equal one step_ref over all their frames."""
    seed = secrets.randbits(32)
    s, b = Shapes(n_groups=2), 3
    rng = torch.Generator().manual_seed(seed + 4)
    lengths = [int(torch.randint(1, 6, (1,), generator=rng)) for _ in range(3)]
    conv, ssm = _pool(seed, s)
    params, zx, slots = _params(seed, s), _frames(seed, s, b, sum(lengths)), _slots(seed, b)
    conv_k, ssm_k = conv.clone(), ssm.clone()
    ys = [step(part, conv_k, ssm_k, slots, **params) for part in zx.split(lengths, dim=1)]
    y_ref = step_ref(zx, conv, ssm, slots, **params)
    errors = {"y": _rel(torch.cat(ys, dim=1), y_ref), "ssm_state": _rel(ssm_k, ssm)}
    for name, err in errors.items():
        assert err < 1e-4, f"seed {seed}, lengths {lengths}: {name} relative error {err:.2e} (all: {errors})"
    assert torch.equal(conv_k, conv), f"seed {seed}, lengths {lengths}: conv cache differs"


@pytest.mark.parametrize("n_groups", [1, 2])
def test_ref_matches_mixer(n_groups: int) -> None:
    """step_ref on pool rows == Mamba2Mixer._run on a MambaLayerState holding those rows (between the projections)."""
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    dims = ModelDimensions(d_model=32, n_layers=1, d_state=16, head_dim=16, n_groups=n_groups, frontend_channels=4)
    mixer = ASRModel(dims).layers[0].mixer
    with torch.no_grad():  # move D, conv_bias and the norm weight off their trivial initial values
        for p in (mixer.D, mixer.conv_bias, mixer.norm.weight):
            p.add_(0.3 * torch.randn_like(p))
    b, l = 3, 5
    u = torch.randn(b, l, dims.d_model)
    slots = _slots(seed, b)
    conv = torch.randn(POOL, dims.conv_dim, dims.d_conv - 1)
    ssm = torch.randn(POOL, dims.n_heads, dims.head_dim, dims.d_state)
    state = MambaLayerState(conv[slots].clone(), ssm[slots].clone())
    seen = []
    mixer.out_proj.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    with torch.no_grad():
        mixer.chunk(u, state, impl=Impl.TORCH)
        y = step_ref(
            mixer.in_proj(u), conv, ssm, slots, mixer.conv_weight, mixer.conv_bias, mixer.dt_bias, mixer.A_log,
            mixer.D, mixer.norm.weight, n_groups, dims.head_dim, mixer.norm.eps,
        )  # fmt: skip
    errors = {"y": _rel(y, seen[0]), "ssm_state": _rel(ssm[slots], state.ssm), "conv": _rel(conv[slots], state.conv)}
    for name, err in errors.items():
        assert err < 1e-5, f"seed {seed}: {name} relative error {err:.2e} (all: {errors})"


def _bad_cases(s: Shapes) -> list[tuple[str, object, str]]:
    """(description, mutate(args) -> args, expected message fragment) for the argument checks."""
    return [
        ("2-d zxbcdt", lambda a: dict(a, zxbcdt=a["zxbcdt"][0]), "zxbcdt must be (B, L, d_in_proj)"),
        ("17 frames", lambda a: dict(a, zxbcdt=torch.randn(2, 17, s.d_in_proj)), "1 to 16 frames"),
        ("wrong d_in_proj", lambda a: dict(a, zxbcdt=a["zxbcdt"][..., 1:]), "last dim must be"),
        ("fp64 state", lambda a: dict(a, ssm_state=a["ssm_state"].double()), "ssm_state must be float32"),
        ("bf16 cache", lambda a: dict(a, conv_cache=a["conv_cache"].bfloat16()), "conv_cache must have"),
        ("short pool", lambda a: dict(a, ssm_state=a["ssm_state"][:-1]), "ssm_state must be (S, H, P, N)"),
        ("strided state", lambda a: dict(a, ssm_state=a["ssm_state"].transpose(2, 3)), "ssm_state must be contiguous"),
        ("strided cache", lambda a: dict(a, conv_cache=a["conv_cache"].mT.contiguous().mT), "must be contiguous"),
        ("slot out of range", lambda a: dict(a, slots=torch.tensor([0, POOL])), "must index the pool"),
        ("negative slot", lambda a: dict(a, slots=torch.tensor([-1, 2])), "must index the pool"),
        ("repeated slot", lambda a: dict(a, slots=torch.tensor([2, 2])), "slots must be distinct"),
        ("int32 slots", lambda a: dict(a, slots=a["slots"].int()), "slots must be int64"),
        ("slots for 3 streams", lambda a: dict(a, slots=torch.tensor([0, 1, 2])), "slots must be int64 of shape"),
        ("bad groups", lambda a: dict(a, n_groups=3), "multiple of n_groups"),
        ("bad norm weight", lambda a: dict(a, norm_weight=a["norm_weight"][1:]), "norm_weight must have shape"),
        ("bad conv bias", lambda a: dict(a, conv_bias=a["conv_bias"][1:]), "conv_bias must have shape"),
        ("width-1 conv", lambda a: dict(a, conv_weight=a["conv_weight"][:, :1]), "K >= 2"),
    ]


BAD_SHAPES = Shapes(n_groups=2)


@pytest.mark.parametrize(
    ("name", "mutate", "message"), _bad_cases(BAD_SHAPES), ids=[c[0] for c in _bad_cases(BAD_SHAPES)]
)
def test_bad_arguments(name: str, mutate, message: str) -> None:
    seed, s = secrets.randbits(32), BAD_SHAPES
    conv, ssm = _pool(seed, s)
    args = dict(
        zxbcdt=_frames(seed, s, 2, 3), conv_cache=conv, ssm_state=ssm, slots=_slots(seed, 2), **_params(seed, s)
    )
    bad = mutate(args)
    before = (bad["conv_cache"].clone(), bad["ssm_state"].clone())
    with pytest.raises(ValueError, match=re.escape(message)):
        step(**bad)
    assert torch.equal(bad["conv_cache"], before[0]) and torch.equal(bad["ssm_state"], before[1]), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 64])
@pytest.mark.parametrize("l", [1, 4, 8, 16])
def test_gpu_model_shapes(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, b: int, l: int) -> None:
    """The default model's sizes (d_inner 512, H 8, P 64, N 64, g 1) on a pool of 96 slots, compiled; bf16 from
    `_SSD_MIN_FRAMES` frames through the chunked form (TF32 dots)."""
    launched = []
    monkeypatch.setattr(kernels.step, "_step_ssd_kernel", _Counting(kernels.step._step_ssd_kernel, launched))
    s = Shapes(heads=8, head_dim=64, d_state=64, n_groups=1)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    _check_step(secrets.randbits(32), s, b, l, dtype, tol, device="cuda", pool=96)
    assert bool(launched) == (dtype == torch.bfloat16 and l >= kernels.step._SSD_MIN_FRAMES), launched


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [1, None], ids=["1-an-SM", "default"])
def test_gpu_persistent_chunked_form(monkeypatch: pytest.MonkeyPatch, programs: int | None) -> None:
    """bf16 at 16 frames with more tiles than programs (512 streams: 16,384 tiles of 16 rows), so that each persistent
    program takes several tiles in turn with its next tile's loads pipelined, as at 1,024 streams; the GPU tests
    above launch fewer tiles than programs. 1 program an SM (about 124 tiles each) and the default."""
    if programs is not None:
        monkeypatch.setattr(kernels.step, "_SSD_PROGRAMS_PER_SM", programs)
    launched = []
    monkeypatch.setattr(kernels.step, "_step_ssd_kernel", _Counting(kernels.step._step_ssd_kernel, launched))
    s = Shapes(heads=8, head_dim=64, d_state=64, n_groups=1)
    _check_step(secrets.randbits(32), s, 512, 16, torch.bfloat16, 1e-2, device="cuda", pool=600)
    tiles = 512 * 8 * 64 // kernels.step._SSD_ROWS
    assert len(launched) == 1 and launched[0][0] < tiles, (launched, tiles)


def compile_for_hopper(frames: int) -> None:
    """Compile each step kernel for sm_90 at the default model's shapes (run with TRITON_INTERPRET=0)."""
    ks = kernels.step
    conv = dict(L=frames, K=4, BLOCK_C=ks._CONV_BLOCK, BLOCK_K=4, BLOCK_L=frames, BLOCK_H=8, ALIGN=8)
    ssd = dict(L=frames, BLOCK_P=ks._SSD_ROWS, BLOCK_N=64, BLOCK_L=16, PRECISION="tf32", STAGES=ks._SSD_STAGES)
    consts = {
        ks._step_conv_kernel: (conv, ks._CONV_WARPS),
        ks._step_scan_kernel: (dict(L=frames, BLOCK_P=ks._SCAN_ROWS, BLOCK_N=64, BLOCK_L=frames), ks._SCAN_WARPS),
        ks._step_ssd_kernel: (ssd, ks._SSD_WARPS),
        ks._step_norm_kernel: (dict(L=frames, BLOCK_L=frames, BLOCK_D=512, ALIGN=8), ks._NORM_WARPS),
    }
    bf16 = {"zx_ptr", "cache_ptr", "w_ptr", "bias_ptr", "norm_w_ptr", "out_ptr"}
    for kernel, (constexprs, warps) in consts.items():
        names = kernel.arg_names
        signature = {
            n: "constexpr" if n in constexprs else "*i64" if n == "slots_ptr" else "*bf16" if n in bf16
            else "*fp32" if n.endswith("_ptr") else "fp32" if n == "eps" else "i32"
            for n in names
        }  # fmt: skip
        src = ASTSource(kernel, signature, constexprs={(names.index(c),): v for c, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        if not compiled.asm["cubin"]:
            raise RuntimeError(f"{kernel.fn.__name__}: no cubin")


@pytest.mark.parametrize("frames", [1, 16])
def test_kernels_compile_for_hopper(frames: int) -> None:
    """Each step kernel compiles for sm_90 (no GPU needed; ptxas comes with Triton). The interpreter runs the kernels
    as Python and misses what only Triton's compiler rejects, such as a name rebound to another type in a branch.
    Compiled in a subprocess: this one interprets (TRITON_INTERPRET=1)."""
    code = f"import tests.test_kernels_step as t; t.compile_for_hopper({frames})"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
