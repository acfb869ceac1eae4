import random

import pytest
import torch

from asr.decoding import decode
from asr.features import CMVN, N_MELS
from asr.model import ASRModel, ModelDimensions
from tests.conftest import TINY


def _stream(model: ASRModel, feats: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Feed padded features through chunk() in random multiples of 4 frames."""
    feats = model.pad_features(feats)
    state = model.init_state(feats.shape[0])
    out, i = [], 0
    while i < feats.shape[1]:
        n = 4 * rng.randint(1, 12)
        logits, returned = model.chunk(feats[:, i : i + n], state)
        assert returned is state
        out.append(logits)
        i += n
    return torch.cat(out, dim=1)


@pytest.fixture
def cmvn_model() -> ASRModel:
    torch.manual_seed(0)
    cmvn = CMVN(torch.randn(N_MELS), torch.rand(N_MELS) + 0.5)
    return ASRModel(TINY, cmvn).eval()


@pytest.mark.parametrize("seed", range(4))
@torch.inference_mode()
def test_streaming_equals_offline(cmvn_model: ASRModel, seed: int) -> None:
    rng = random.Random(seed)
    feats = torch.randn(2, rng.randint(150, 260), N_MELS) * 2 - 5  # any length: the tail is padded
    offline = cmvn_model(feats)
    streamed = _stream(cmvn_model, feats, rng)
    assert offline.shape == streamed.shape == (2, -(-feats.shape[1] // 4), TINY.vocab_size)
    torch.testing.assert_close(streamed, offline, rtol=1e-5, atol=1e-5)
    for b in range(2):
        off = decode(offline[b].log_softmax(-1))
        st = decode(streamed[b].log_softmax(-1))
        assert off == st and off.text


@torch.inference_mode()
def test_one_frame_chunks_equal_offline(cmvn_model: ASRModel) -> None:
    feats = torch.randn(1, 96, N_MELS)
    state = cmvn_model.init_state(1)
    streamed = torch.cat([cmvn_model.chunk(feats[:, i : i + 4], state)[0] for i in range(0, 96, 4)], 1)
    torch.testing.assert_close(streamed, cmvn_model(feats), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_state_is_updated_in_place(cmvn_model: ASRModel) -> None:
    state = cmvn_model.init_state(3)
    before = [(t.data_ptr(), t.shape, t.dtype) for t in state.tensors()]
    assert all(t.abs().sum() == 0 for t in state.tensors())
    cmvn_model.chunk(torch.randn(3, 8, N_MELS), state)
    assert [(t.data_ptr(), t.shape, t.dtype) for t in state.tensors()] == before
    assert all(t.abs().sum() > 0 for t in state.tensors())
    assert state.zero_() is state and all(t.abs().sum() == 0 for t in state.tensors())


@torch.inference_mode()
def test_reset_state_replays_identically(cmvn_model: ASRModel) -> None:
    feats = torch.randn(1, 40, N_MELS)
    state = cmvn_model.init_state(1)
    first = cmvn_model.chunk(feats, state)[0]
    second_from_dirty = cmvn_model.chunk(feats, state)[0]
    again = cmvn_model.chunk(feats, state.zero_())[0]
    assert torch.equal(first, again) and not torch.allclose(first, second_from_dirty)


@torch.inference_mode()
def test_output_is_causal(cmvn_model: ASRModel) -> None:
    feats = torch.randn(1, 80, N_MELS)
    changed = feats.clone()
    changed[:, 40:] += 1.0  # frames 40.. feed encoder frames 10..
    a, b = cmvn_model(feats), cmvn_model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@torch.inference_mode()
def test_batch_rows_are_independent(cmvn_model: ASRModel) -> None:
    feats = torch.randn(2, 48, N_MELS)
    both = cmvn_model(feats)
    torch.testing.assert_close(both[1:], cmvn_model(feats[1:]), rtol=1e-5, atol=1e-5)


def test_chunk_rejects_partial_groups(cmvn_model: ASRModel) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        cmvn_model.chunk(torch.randn(1, 6, N_MELS), cmvn_model.init_state(1))
    logits, _ = cmvn_model.chunk(torch.randn(1, 0, N_MELS), cmvn_model.init_state(1))
    assert logits.shape == (1, 0, TINY.vocab_size)


@torch.inference_mode()
def test_bf16_weights_keep_float32_ssm_state() -> None:
    torch.manual_seed(0)
    model = ASRModel(TINY).to(torch.bfloat16).eval()
    state = model.init_state(1)
    assert all(layer.ssm.dtype == torch.float32 for layer in state.layers)
    assert all(layer.conv.dtype == torch.bfloat16 for layer in state.layers)
    logits, _ = model.chunk(torch.randn(1, 16, N_MELS), state)
    assert torch.isfinite(logits).all() and state.layers[0].ssm.dtype == torch.float32


def test_gradients_flow_to_every_parameter() -> None:
    torch.manual_seed(0)
    model = ASRModel(TINY)
    model(torch.randn(2, 64, N_MELS)).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_dimensions_are_validated() -> None:
    d = ModelDimensions()
    assert (d.d_inner, d.n_heads, d.conv_dim) == (512, 8, 640)
    with pytest.raises(ValueError, match="head_dim"):
        ModelDimensions(d_model=100, head_dim=64)
    with pytest.raises(ValueError, match="n_groups"):
        ModelDimensions(n_groups=3)
    with pytest.raises(ValueError, match="positive"):
        ModelDimensions(n_layers=0)


def test_output_lengths() -> None:
    assert ASRModel.output_lengths(torch.tensor([0, 1, 4, 5, 8])).tolist() == [0, 1, 1, 2, 2]


def test_compiled_blocks_match_eager_for_any_shape_without_recompiling() -> None:
    """`compile_blocks` (training) gives eager's outputs and gradients, and one compile serves every batch size
    and length (a recompile per shape would make training slower than eager). The "eager" backend runs dynamo's
    graph capture and guards without generating code; inductor's own size guards are the GPU test's."""
    torch.manual_seed(0)
    eager = ASRModel(TINY)
    compiled = ASRModel(TINY)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    shapes = [(3, 300), (5, 41), (2, 397), (4, 270)]  # 75, 11, 100 and 68 encoder frames
    for i, (b, t) in enumerate(shapes):
        feats = torch.randn(b, t, N_MELS)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            y = compiled(feats)
        torch.testing.assert_close(y, eager(feats))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # compiled: the pieces around the scan
    y.square().sum().backward()
    eager(feats).square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
