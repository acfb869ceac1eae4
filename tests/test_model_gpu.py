"""The model on CUDA, where the Triton scan replaces the PyTorch one. Run with `pytest -m gpu`."""

import random

import pytest
import torch

from asr.features import CMVN, N_MELS
from asr.model import ASRModel, ModelDimensions

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
