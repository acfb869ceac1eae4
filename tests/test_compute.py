"""The step process of `asr serve --workers N --step-process` (streaming.compute), and the parent's supervision of
it (streaming.workers). The end-to-end run through a real server is in test_server.py."""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import streaming.workers
from asr.checkpoint import load_config, load_model
from asr.features import N_MELS, WINDOW_SAMPLES, LogMel
from asr.stepper import EncoderStepper
from streaming.compute import Features, LocalCompute, Reset, SharedBuffers, Step, StepPlan, StepSpec, _answer

SLOTS = 3  # per worker


def _plan(tiny_model, workers: int) -> tuple[LocalCompute, StepPlan]:
    compute = LocalCompute(tiny_model, SLOTS * workers, torch.device("cpu"))
    buffers = [SharedBuffers.allocate(SLOTS, tiny_model.dims.vocab_size) for _ in range(workers)]
    spec = StepSpec(Path("unused"), "cpu", tiny_model.dims.vocab_size, torch.float32)
    return compute, StepPlan(spec, SLOTS, [], buffers)


def test_one_step_for_the_requests_of_all_workers(tiny_model, monkeypatch) -> None:
    """Step requests of two workers with the same frame count go through one batched step, on each worker's own
    slots (worker i's slot j is pool row i * SLOTS + j); the results equal stepping each stream alone."""
    compute, plan = _plan(tiny_model, 2)
    calls = []
    step = compute.step
    monkeypatch.setattr(compute, "step", lambda feats, slots: calls.append(list(slots)) or step(feats, slots))
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 8, N_MELS, generator=gen) * 3 - 8 for _ in range(2)]
    requests = []
    for w, (f, slots) in enumerate(zip(feats, [[2, 0], [1, 2]], strict=True)):
        plan.buffers[w].step_in[:2, :8].copy_(f)
        plan.buffers[w].slots[:2].copy_(torch.tensor(slots))
        requests.append((w, Step(2, 2)))
    for _ in range(2):  # twice: the second step starts from the state the first left in each slot
        assert _answer(compute, plan, requests) == {}
    assert calls == [[2, 0, 4, 5]] * 2

    alone = EncoderStepper(tiny_model, 1, "cpu")
    for w, slot_feats in enumerate(feats):
        for row in range(2):
            alone.reset([0])
            for _ in range(2):
                expected = alone(slot_feats[row : row + 1], [0])
            got = plan.buffers[w].step_out[row, :2]
            torch.testing.assert_close(got, expected[0], rtol=1e-5, atol=1e-5)


def test_features_resets_and_bad_requests(tiny_model) -> None:
    """Features of two workers in one call equal LogMel's; a reset zeroes only its worker's slot; a request out
    of range gets an error message, and the others in its round still run."""
    compute, plan = _plan(tiny_model, 2)
    windows = [torch.randn(n, WINDOW_SAMPLES, generator=torch.Generator().manual_seed(n)) for n in (5, 3)]
    for w, win in enumerate(windows):
        plan.buffers[w].windows[: len(win)].copy_(win)
    with torch.inference_mode():
        for t in compute.stepper.pool.tensors():
            t.fill_(1.0)
    requests = [(0, Features(5)), (1, Features(3)), (1, Reset((1,))), (0, Step(9, 1))]
    errors = _answer(compute, plan, requests)
    assert list(errors) == [0] and "bad request" in errors[0]
    for w, win in enumerate(windows):
        torch.testing.assert_close(plan.buffers[w].feats[: len(win)], LogMel().frames(win), rtol=0, atol=0)
    for t in compute.stepper.pool.tensors():
        assert torch.all(t[SLOTS + 1] == 0) and torch.all(t[1] == 1) and torch.all(t[SLOTS] == 1)


def _exit_with(code: int) -> None:
    sys.exit(code)


def _until_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(60)


def _ignoring_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


@pytest.mark.parametrize("worker", [_until_sigterm, _ignoring_sigterm], ids=["drains", "hangs"])
def test_a_dead_step_process_stops_the_server(worker, monkeypatch) -> None:
    """If the step process dies unasked, the workers are told to drain, killed if they do not finish within
    KILL_AFTER_S, and the parent's exit code is 1."""
    monkeypatch.setattr(streaming.workers, "KILL_AFTER_S", 2.0)
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=worker) for _ in range(2)]
    stepper = ctx.Process(target=_exit_with, args=(3,))
    for p in workers:
        p.start()
    time.sleep(1.0)  # the workers have set their signal handlers
    stepper.start()
    start = time.monotonic()
    assert streaming.workers._supervise(workers, stepper) == 1
    assert time.monotonic() - start < 30
    assert all(not p.is_alive() for p in [*workers, stepper])


def test_remote_compute_through_a_real_step_process(tiny_model, tiny_model_dir) -> None:
    """A worker's RemoteCompute against a spawned step process: features and steps equal local ones, a result
    stays as it was after the next request (the buffers are reused; the language model keeps log-probs), chunks
    longer than a graph are split exactly, and the process ends once its worker hangs up."""
    ctx = mp.get_context("spawn")
    proc, (remote,) = streaming.workers._start_step_process(
        ctx, StepSpec(tiny_model_dir, "cpu", tiny_model.dims.vocab_size, torch.float32), count=1, per_worker=2
    )
    try:
        local = LocalCompute(tiny_model, 2, torch.device("cpu"))
        windows = torch.randn(7, WINDOW_SAMPLES, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(remote.features(windows), local.features(windows), rtol=0, atol=0)
        gen = torch.Generator().manual_seed(2)
        chunks = [torch.randn(2, 4 * frames, N_MELS, generator=gen) * 3 - 8 for frames in (3, 20)]
        first = remote.step(chunks[0], [1, 0])
        kept = first.clone()
        second = remote.step(chunks[1], [1, 0])
        torch.testing.assert_close(first, kept, rtol=0, atol=0)
        expected = [local.step(c, [1, 0]) for c in chunks]
        torch.testing.assert_close(first, expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, expected[1], rtol=1e-5, atol=1e-5)
        assert second.shape[1] == 20
    finally:
        remote.conn.close()
        proc.join(30)
    assert proc.exitcode == 0


def test_step_process_loads_the_model_in_the_asked_dtype(tiny_model_dir) -> None:
    """`asr serve --dtype bfloat16 --step-process`: the step process loads the model in bfloat16, so its steps equal
    a local bfloat16 model's and differ from float32's."""
    ctx = mp.get_context("spawn")
    vocab = load_config(tiny_model_dir).dims.vocab_size
    proc, (remote,) = streaming.workers._start_step_process(
        ctx, StepSpec(tiny_model_dir, "cpu", vocab, torch.bfloat16), count=1, per_worker=1
    )
    try:
        feats = torch.randn(1, 4 * 5, N_MELS, generator=torch.Generator().manual_seed(3)) * 3 - 8
        got = remote.step(feats, [0])
        expected = {}
        for dtype in (torch.float32, torch.bfloat16):
            local = LocalCompute(load_model(tiny_model_dir, dtype=dtype)[0], 1, torch.device("cpu"))
            expected[dtype] = local.step(feats, [0])
        torch.testing.assert_close(got, expected[torch.bfloat16], rtol=0, atol=0)
        assert not torch.allclose(got, expected[torch.float32], rtol=1e-4, atol=1e-4)
    finally:
        remote.conn.close()
        proc.join(30)
    assert proc.exitcode == 0
