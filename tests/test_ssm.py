import pytest
import torch
import torch.nn.functional as F

from asr.ssm import causal_conv1d, gated_rms_norm, rms_norm, ssd_scan, ssm_scan_ref


def _inputs(b=2, l=100, h=4, p=8, g=2, n=16, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g_)
    dt = F.softplus(torch.randn(b, l, h, generator=g_) - 1)
    A = -torch.rand(h, generator=g_) * 4 - 0.1
    B = torch.randn(b, l, g, n, generator=g_)
    C = torch.randn(b, l, g, n, generator=g_)
    s0 = torch.randn(b, h, p, n, generator=g_)
    return x, dt, A, B, C, s0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("l, chunk", [(100, 16), (64, 64), (5, 64), (1, 4), (130, 32)])
def test_chunked_scan_matches_recurrence(l: int, chunk: int) -> None:
    x, dt, A, B, C, s0 = _inputs(l=l, seed=l)
    y_ref, s_ref = ssm_scan_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), s0.double())
    y, s = ssd_scan(x, dt, A, B, C, initial_state=s0, chunk_size=chunk)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert _rel(y.double(), y_ref) < 1e-5 and _rel(s.double(), s_ref) < 1e-5


def test_scan_split_anywhere_carries_state() -> None:
    x, dt, A, B, C, s0 = _inputs(l=90, seed=7)
    y_all, s_all = ssd_scan(x, dt, A, B, C, initial_state=s0)
    y1, s1 = ssd_scan(x[:, :37], dt[:, :37], A, B[:, :37], C[:, :37], initial_state=s0)
    y2, s2 = ssd_scan(x[:, 37:], dt[:, 37:], A, B[:, 37:], C[:, 37:], initial_state=s1)
    assert _rel(torch.cat([y1, y2], 1), y_all) < 1e-5 and _rel(s2, s_all) < 1e-5


def test_scan_state_is_float32_for_bf16_inputs() -> None:
    x, dt, A, B, C, _ = _inputs(l=20)
    y, s = ssd_scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16())
    assert s.dtype == torch.float32 and y.dtype == torch.float32


def test_causal_conv_cache_chains() -> None:
    x = torch.randn(2, 50, 6)
    w, bias = torch.randn(6, 4), torch.randn(6)
    y_all, cache_all = causal_conv1d(x, w, bias)
    y1, c1 = causal_conv1d(x[:, :3], w, bias)
    y2, c2 = causal_conv1d(x[:, 3:4], w, bias, c1)
    y3, c3 = causal_conv1d(x[:, 4:], w, bias, c2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y_all)
    torch.testing.assert_close(c3, cache_all)
    # The definition: a depthwise conv over the input left-padded with k - 1 zeros, then SiLU.
    direct = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w.unsqueeze(1), bias, groups=6)).transpose(1, 2)
    torch.testing.assert_close(y_all, direct)
    y_bf16, cache_bf16 = causal_conv1d(x.bfloat16(), w, bias)
    assert y_bf16.dtype == cache_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), direct, atol=0.05, rtol=0.02)


def test_norms() -> None:
    y, z, w = torch.randn(3, 10), torch.randn(3, 10), torch.rand(10) + 0.5
    expected = y * F.silu(z)
    expected = expected / expected.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w
    torch.testing.assert_close(gated_rms_norm(y, z, w), expected)
    torch.testing.assert_close(rms_norm(y, w), y / y.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w)
