"""`kernels.norm.add_rms_norm` against `add_rms_norm_ref` (Triton's interpreter on the CPU; compiled on the GPU)."""

import re
import secrets

import pytest
import torch

from kernels.norm import add_rms_norm, add_rms_norm_ref


def _inputs(seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    y = torch.randn(shape, generator=gen).to(dtype).to(device)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype).to(device)
    return x, y, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2, 32), (5, 48), (1, 1, 256), (130, 32)])  # (130, 32): 3 programs
@pytest.mark.parametrize("with_y", [True, False])
def test_matches_ref(dtype: torch.dtype, shape: tuple[int, ...], with_y: bool) -> None:
    seed = secrets.randbits(32)
    x, y, w = _inputs(seed, shape, dtype)
    y = y if with_y else None
    x_new, h = add_rms_norm(x, y, w)
    x_ref, _ = add_rms_norm_ref(x, y, w)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    # the interpreter rounds float32 -> bfloat16 toward zero (compiled Triton and PyTorch round to nearest), so
    # bf16 sums may differ by one unit here; test_gpu checks that they are bit-identical on the GPU
    torch.testing.assert_close(x_new, x_ref, rtol=0 if dtype == torch.float32 else 1e-2, atol=0, msg=f"seed {seed}")
    _, h_of_sum = add_rms_norm_ref(x_new, None, w)  # the norm alone, of the sum the kernel made
    torch.testing.assert_close(h, h_of_sum, rtol=tol, atol=tol, msg=f"seed {seed}")
    assert h.dtype == dtype and h.shape == shape


def test_bad_arguments() -> None:
    x, y, w = _inputs(0, (2, 8), torch.float32)
    cases = [
        (x, y[:, :4], w, "y must be contiguous with x's shape"),
        (x, y.bfloat16(), w, "y must be contiguous with x's shape"),
        (x, y, w[:4], "weight must have shape (8,)"),
        (x.mT.contiguous().mT, None, w[:2], "x must be a contiguous"),
        (x.double(), None, w, "x must be a contiguous"),
    ]
    for a, b, c, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            add_rms_norm(a, b, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu(dtype: torch.dtype) -> None:
    seed = secrets.randbits(32)
    x, y, w = _inputs(seed, (64, 8, 256), dtype, "cuda")
    x_new, h = add_rms_norm(x, y, w)
    x_ref, h_ref = add_rms_norm_ref(x, y, w)
    assert torch.equal(x_new, x_ref), f"seed {seed}"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol, msg=f"seed {seed}")
