"""The two-launch block step (`kernels.block_step.block_step`) against `block_step_ref`, and `block_step_ref` against
`MambaBlock.chunk`.

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

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.block_step as ks
from asr.model import ASRModel, Impl, MambaLayerState, ModelDimensions
from kernels.block_step import block_step, block_step_ref
from tests.test_kernels_step import POOL, Shapes, _params, _pool, _rel, _slots

D_MODEL = 48  # not a multiple of the kernels' 64-column blocks: masked lanes


def _block_params(seed: int, s: Shapes, dtype=torch.float32, device="cpu") -> dict:
    """block_step's parameters: the mixer's (from test_kernels_step) plus the norms and the two projections."""
    gen = torch.Generator().manual_seed(seed + 5)
    mixer = _params(seed, s, dtype, device)
    gate_norm_weight = mixer.pop("norm_weight")
    extra = dict(
        norm_weight=1 + 0.3 * torch.randn(D_MODEL, generator=gen),
        in_proj=torch.randn(s.d_in_proj, D_MODEL, generator=gen) / D_MODEL**0.5,
        out_proj=torch.randn(D_MODEL, s.d_inner, generator=gen) / s.d_inner**0.5,
    )
    extra = {k: v.to(dtype).to(device) for k, v in extra.items()}
    return dict(mixer, gate_norm_weight=gate_norm_weight, **extra)


def _x(seed: int, b: int, l: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(b, l, D_MODEL, generator=torch.Generator().manual_seed(seed + 6)).to(dtype).to(device)


def _check_block(seed: int, s: Shapes, b: int, l: int, dtype, tol: float, device="cpu", pool: int = POOL) -> None:
    """block_step() and block_step_ref() on copies of one pool: the output, the stepped rows and the untouched rest."""
    conv, ssm = _pool(seed, s, dtype, device, pool)
    params = _block_params(seed, s, dtype, device)
    x, slots = _x(seed, b, l, dtype, device), _slots(seed, b, device, pool)
    conv_k, ssm_k, conv_r, ssm_r = conv.clone(), ssm.clone(), conv.clone(), ssm.clone()
    out = block_step(x, conv_k, ssm_k, slots, **params)
    out_ref = block_step_ref(x, conv_r, ssm_r, slots, **params)
    assert out.dtype == x.dtype and out.shape == x.shape, f"seed {seed}: out {out.dtype} {tuple(out.shape)}"
    errors = {"out - x": _rel(out.float() - x.float(), out_ref.float() - x.float()), "ssm": _rel(ssm_k, ssm_r)}
    for name, err in errors.items():
        assert err < tol, f"seed {seed}: {name} relative error {err:.2e} >= {tol:.0e} (all: {errors})"
    conv_err = _rel(conv_k, conv_r)
    assert conv_err < (1e-6 if dtype == torch.float32 else tol), f"seed {seed}: conv cache error {conv_err:.2e}"
    others = torch.tensor([i for i in range(pool) if i not in slots.tolist()], dtype=torch.long, device=device)
    assert torch.equal(conv_k[others], conv[others]), f"seed {seed}: conv cache rows outside slots changed"
    assert torch.equal(ssm_k[others], ssm[others]), f"seed {seed}: ssm state rows outside slots changed"


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize(("b", "l"), [(1, 1), (3, 2), (2, 16)])
def test_matches_ref(n_groups: int, b: int, l: int) -> None:
    _check_block(secrets.randbits(32), Shapes(n_groups=n_groups), b, l, torch.float32, 1e-4)


def test_matches_ref_bf16() -> None:
    """bf16 weights, activations and conv cache (the state stays float32)."""
    _check_block(secrets.randbits(32), Shapes(n_groups=2), 3, 3, torch.bfloat16, 3e-2)


def test_wide_heads() -> None:
    """head_dim 32 and d_state 32 with 2 heads, conv width 3: other tile sizes than the defaults."""
    _check_block(secrets.randbits(32), Shapes(heads=2, head_dim=32, d_state=32, d_conv=3), 2, 5, torch.float32, 1e-4)


def test_chained_steps_equal_one_step() -> None:
    """Steps of random lengths on the pool equal one block_step_ref over all their frames."""
    seed = secrets.randbits(32)
    s, b = Shapes(n_groups=2), 2
    rng = torch.Generator().manual_seed(seed + 4)
    lengths = [int(torch.randint(1, 5, (1,), generator=rng)) for _ in range(3)]
    conv, ssm = _pool(seed, s)
    params, x, slots = _block_params(seed, s), _x(seed, b, sum(lengths)), _slots(seed, b)
    conv_k, ssm_k = conv.clone(), ssm.clone()
    outs = [block_step(part, conv_k, ssm_k, slots, **params) for part in x.split(lengths, dim=1)]
    out_ref = block_step_ref(x, conv, ssm, slots, **params)
    errors = {"out": _rel(torch.cat(outs, dim=1) - x, out_ref - x), "ssm": _rel(ssm_k, ssm), "conv": _rel(conv_k, conv)}
    for name, err in errors.items():
        assert err < 1e-4, f"seed {seed}, lengths {lengths}: {name} relative error {err:.2e} (all: {errors})"


def test_ref_matches_block() -> None:
    """block_step_ref on pool rows == MambaBlock.chunk (the PyTorch reference) on a state holding those rows."""
    seed = secrets.randbits(32)
    torch.manual_seed(seed)
    dims = ModelDimensions(d_model=32, n_layers=1, d_state=16, head_dim=16, n_groups=2, frontend_channels=4)
    block = ASRModel(dims).layers[0]
    mixer = block.mixer
    with torch.no_grad():  # move D, conv_bias and the norm weights off their trivial initial values
        for p in (mixer.D, mixer.conv_bias, mixer.norm.weight, block.norm.weight):
            p.add_(0.3 * torch.randn_like(p))
    b, l = 3, 5
    x = torch.randn(b, l, dims.d_model)
    slots = _slots(seed, b)
    conv = torch.randn(POOL, dims.conv_dim, dims.d_conv - 1)
    ssm = torch.randn(POOL, dims.n_heads, dims.head_dim, dims.d_state)
    state = MambaLayerState(conv[slots].clone(), ssm[slots].clone())
    with torch.no_grad():
        expected, _ = block.chunk(x, state, impl=Impl.TORCH)
        out = block_step_ref(
            x, conv, ssm, slots, block.norm.weight, mixer.in_proj.weight, mixer.conv_weight, mixer.conv_bias,
            mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, mixer.out_proj.weight, dims.n_groups,
            dims.head_dim, block.norm.eps, mixer.norm.eps,
        )  # fmt: skip
    errors = {"out": _rel(out, expected), "ssm": _rel(ssm[slots], state.ssm), "conv": _rel(conv[slots], state.conv)}
    for name, err in errors.items():
        assert err < 1e-5, f"seed {seed}: {name} relative error {err:.2e} (all: {errors})"


def _bad_cases(s: Shapes) -> list[tuple[str, object, str]]:
    """(description, mutate(args) -> args, expected message fragment) for the argument checks of its own."""
    return [
        ("2-d x", lambda a: dict(a, x=a["x"][0]), "x must be (B, L, d_model)"),
        ("17 frames", lambda a: dict(a, x=torch.randn(2, 17, D_MODEL)), "1 to 16 frames"),
        ("short in_proj", lambda a: dict(a, in_proj=a["in_proj"][1:]), "last dim must be"),
        ("narrow in_proj", lambda a: dict(a, in_proj=a["in_proj"][:, 1:]), "in_proj must have shape"),
        ("bf16 out_proj", lambda a: dict(a, out_proj=a["out_proj"].bfloat16()), "out_proj must have x's dtype"),
        ("bad norm weight", lambda a: dict(a, norm_weight=a["norm_weight"][1:]), "norm_weight must have shape"),
        ("fp64 state", lambda a: dict(a, ssm_state=a["ssm_state"].double()), "ssm_state must be float32"),
        ("repeated slot", lambda a: dict(a, slots=torch.tensor([2, 2])), "slots must be distinct"),
    ]


BAD_SHAPES = Shapes(n_groups=2)


@pytest.mark.parametrize(
    ("name", "mutate", "message"), _bad_cases(BAD_SHAPES), ids=[c[0] for c in _bad_cases(BAD_SHAPES)]
)
def test_bad_arguments(name: str, mutate, message: str) -> None:
    seed, s = secrets.randbits(32), BAD_SHAPES
    conv, ssm = _pool(seed, s)
    args = dict(x=_x(seed, 2, 3), conv_cache=conv, ssm_state=ssm, slots=_slots(seed, 2), **_block_params(seed, s))
    bad = mutate(args)
    before = (bad["conv_cache"].clone(), bad["ssm_state"].clone())
    with pytest.raises(ValueError, match=re.escape(message)):
        block_step(**bad)
    assert torch.equal(bad["conv_cache"], before[0]) and torch.equal(bad["ssm_state"], before[1]), name


def test_dims_it_cannot_take() -> None:
    """head_dim or d_state below 16 or not a power of two: a clear error (the model then takes the general path)."""
    assert ks.fits(64, 64) and ks.fits(16, 32) and not ks.fits(12, 16) and not ks.fits(16, 8)
    seed, s = secrets.randbits(32), Shapes(heads=2, head_dim=12, d_state=16)
    conv, ssm = _pool(seed, s)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        block_step(_x(seed, 1, 1), conv, ssm, _slots(seed, 1), **_block_params(seed, s))


def compile_for_hopper(frames: int) -> None:
    """Compile both block kernels for sm_90 at the default model's shapes, bf16 (run with TRITON_INTERPRET=0)."""
    shared = dict(L=frames, K=4, P=64, N=64, BLOCK_M=max(16, frames), BLOCK_K=4, PRECISION="tf32")
    consts = {
        ks._block_in_kernel: (dict(shared, BLOCK_D=64), ks._IN_WARPS),
        ks._block_out_kernel: (dict(shared, BLOCK_I=128, BLOCK_O=32), ks._OUT_WARPS),
    }
    fp32 = {"g_ptr", "state_ptr", "A_log_ptr", "D_ptr", "dt_bias_ptr"}
    for kernel, (constexprs, warps) in consts.items():
        names = kernel.arg_names
        signature = {
            n: "constexpr" if n in constexprs else "*i64" if n == "slots_ptr" else "*fp32" if n in fp32
            else "*bf16" if n.endswith("_ptr") else "fp32" if n == "eps" else "i32"
            for n in names
        }  # fmt: skip
        src = ASTSource(kernel, signature, constexprs={(names.index(c),): v for c, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        if not compiled.asm["cubin"]:
            raise RuntimeError(f"{kernel.fn.__name__}: no cubin")


@pytest.mark.parametrize("frames", [1, 16])
def test_kernels_compile_for_hopper(frames: int) -> None:
    """Both block kernels compile for sm_90 (no GPU needed; ptxas comes with Triton). Compiled in a subprocess: this
    one interprets (TRITON_INTERPRET=1)."""
    code = f"import tests.test_kernels_block as t; t.compile_for_hopper({frames})"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 16])
@pytest.mark.parametrize("l", [1, 8])
def test_gpu_model_shapes(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, b: int, l: int) -> None:
    """The default model's sizes (d_model 256, d_inner 512, H 8, P 64, N 64, g 1) on a pool of 96 slots, compiled."""
    monkeypatch.setattr(sys.modules[__name__], "D_MODEL", 256)
    s = Shapes(heads=8, head_dim=64, d_state=64, n_groups=1)
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    _check_block(secrets.randbits(32), s, b, l, dtype, tol, device="cuda", pool=96)
