"""The Triton SSD scan (forward and backward) against the plain recurrence `asr.ssm.ssm_scan_ref`.

CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) with exact
fp32 dots; the gpu-marked tests run the compiled kernels, whose dots use tf32, at the model's shapes.
Every test draws fresh inputs and names its seed in the failure message.
"""

from __future__ import annotations

import secrets

import pytest
import torch
import torch.nn.functional as F

from asr.ssm import ssm_scan_ref
from kernels.ssd_scan import ssd_scan

NAMES = ("x", "dt", "A", "B", "C")


def _inputs(seed: int, b: int, l: int, h: int, p: int, g: int, n: int, dtype=torch.float32, device="cpu"):
    """x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n) in dtype (dt and A float32), s0 (b, h, p, n),
    and an upstream gradient dy (b, l, h, p)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1)
    A = -torch.rand(h, generator=gen) * 4 - 0.1
    B = torch.randn(b, l, g, n, generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, generator=gen).to(dtype)
    s0 = torch.randn(b, h, p, n, generator=gen)
    dy = torch.randn(b, l, h, p, generator=gen)
    return [t.to(device) for t in (x, dt, A, B, C)], s0.to(device), dy.to(device)


def _run(scan, inputs, s0, dy, dtype=None, **kwargs):
    """y, final state and the gradients of <y, dy> w.r.t. x, dt, A, B, C (inputs cast to dtype first)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    y, state = scan(*leaves, s0 if s0 is None else s0.to(dtype or s0.dtype), **kwargs)
    y.backward(dy.to(y.dtype))
    return y, state, [t.grad for t in leaves]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; NaN (which fails every bound) if a has NaNs."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _compare(seed, inputs, s0, dy, chunk, y_tol, grad_tol):
    """The kernel against the reference run on float64 copies of the same inputs."""
    y, state, grads = _run(ssd_scan, inputs, s0, dy, chunk_size=chunk)
    y_ref, state_ref, grads_ref = _run(ssm_scan_ref, inputs, s0, dy, dtype=torch.float64)
    assert y.dtype == state.dtype == torch.float32
    assert not state.requires_grad
    errors = {"y": _rel(y, y_ref), "state": _rel(state, state_ref)}
    errors.update({f"d{k}": _rel(gr, ref) for k, gr, ref in zip(NAMES, grads, grads_ref, strict=True)})
    for name, err in errors.items():
        tol = y_tol if name in ("y", "state") else grad_tol
        assert err < tol, f"seed {seed}: {name} relative error {err:.2e} >= {tol:.0e} (all: {errors})"
    for name, gr, t in zip(NAMES, grads, inputs, strict=True):
        assert gr.dtype == t.dtype, f"d{name} is {gr.dtype}, input {t.dtype}"


@pytest.mark.parametrize("l", [5, 16, 37, 50])
@pytest.mark.parametrize("g, with_state", [(1, False), (2, True), (1, True), (2, False)])
def test_matches_recurrence(l: int, g: int, with_state: bool) -> None:
    seed = secrets.randbits(31)
    inputs, s0, dy = _inputs(seed, b=2, l=l, h=4, p=16, g=g, n=16)
    _compare(seed, inputs, s0 if with_state else None, dy, chunk=16, y_tol=1e-4, grad_tol=1e-4)


def test_sizes_below_the_dot_minimum_and_longer_chunks() -> None:
    """p and n not powers of two (padded to 16 inside the kernels), chunk 32, several chunks."""
    seed = secrets.randbits(31)
    inputs, s0, dy = _inputs(seed, b=1, l=70, h=6, p=12, g=3, n=8)
    _compare(seed, inputs, s0, dy, chunk=32, y_tol=1e-4, grad_tol=1e-4)


def test_bf16_inputs() -> None:
    """bf16 loads are exact in fp32: only the bf16 rounding of the returned gradients costs accuracy."""
    seed = secrets.randbits(31)
    inputs, s0, dy = _inputs(seed, b=2, l=37, h=4, p=16, g=2, n=16, dtype=torch.bfloat16)
    _compare(seed, inputs, s0, dy, chunk=16, y_tol=1e-4, grad_tol=1e-2)


def test_final_state_continues_the_scan() -> None:
    seed = secrets.randbits(31)
    (x, dt, A, B, C), s0, _ = _inputs(seed, b=2, l=50, h=4, p=16, g=2, n=16)
    y_all, s_all = ssd_scan(x, dt, A, B, C, s0, chunk_size=16)
    y1, s1 = ssd_scan(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], s0, chunk_size=16)
    y2, s2 = ssd_scan(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], s1, chunk_size=16)
    assert _rel(torch.cat([y1, y2], 1), y_all) < 1e-5 and _rel(s2, s_all) < 1e-5, f"seed {seed}"


def _bad_inputs(**override):
    (x, dt, A, B, C), s0, _ = _inputs(secrets.randbits(31), b=2, l=20, h=4, p=16, g=2, n=16)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, initial_state=s0, chunk_size=16)
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(x=torch.randn(2, 20, 64)), "x must be"),
        (dict(dt=torch.rand(2, 21, 4)), "dt must have shape"),
        (dict(A=-torch.rand(3)), "A must have shape"),
        (dict(B=torch.randn(2, 20, 3, 16)), "multiple of the number of groups"),
        (dict(B=torch.randn(2, 19, 2, 16)), "B must be"),
        (dict(C=torch.randn(2, 20, 2, 8)), "C must have shape"),
        (dict(initial_state=torch.randn(2, 4, 16, 8)), "initial_state must have shape"),
        (dict(chunk_size=48), "power of two"),
        (dict(chunk_size=8), "power of two"),
        (dict(x=torch.randint(0, 3, (2, 20, 4, 16))), "float32, bfloat16 or float16"),
    ],
)
def test_bad_arguments_raise(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ssd_scan(**_bad_inputs(**override))


def test_initial_state_requiring_grad_raises() -> None:
    args = _bad_inputs()
    args["initial_state"].requires_grad_()
    with pytest.raises(ValueError, match="initial_state must not require grad"):
        ssd_scan(**args)


# Compiled on the GPU the dots use tf32 (about 3e-4 relative error measured in an emulation at these shapes, dA up
# to 1e-3), and bf16 gradients add their own rounding (about 2e-3).
@pytest.mark.gpu
@pytest.mark.parametrize("l", [1500, 37])
@pytest.mark.parametrize(
    "dtype, grad_tol", [pytest.param(torch.bfloat16, 1e-2, id="bf16"), pytest.param(torch.float32, 5e-3, id="fp32")]
)
def test_gpu_model_shapes(l: int, dtype: torch.dtype, grad_tol: float) -> None:
    seed = secrets.randbits(31)
    inputs, s0, dy = _inputs(seed, b=4, l=l, h=8, p=64, g=1, n=64, dtype=dtype, device="cuda")
    _compare(seed, inputs, None, dy, chunk=64, y_tol=2e-3, grad_tol=grad_tol)
    _compare(seed, inputs, s0, dy, chunk=64, y_tol=2e-3, grad_tol=grad_tol)
