"""The WebSocket server, end to end on a real server on port 0 (native and Vosk protocols)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response
from websockets.sync.client import connect

from asr.decoding import Segment, Word
from asr.lm import BeamConfig, BeamSearch, RescoreJob, SegmentRescorer
from asr.model import ASRModel
from asr.transcribe import transcribe_file
from streaming import protocol as P
from streaming.engine import Engine, Stream
from streaming.server import ASRServer, ServerConfig

ROOT = Path(__file__).resolve().parents[1]


class RunningServer:
    """An ASRServer on its own event loop in a background thread."""

    def __init__(self, model: ASRModel, config: ServerConfig, search: BeamSearch | None = None) -> None:
        self.server = ASRServer(model, torch.device("cpu"), config, {"name": "tiny"}, search)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise RuntimeError("server did not start")
        self.url = f"ws://127.0.0.1:{self.server.port}"
        self.http = f"http://127.0.0.1:{self.server.port}"

    def call(self, fn):
        """Run fn() on the server's loop and return its result (for inspecting its state)."""
        return asyncio.run_coroutine_threadsafe(_as_coro(fn), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.drain(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _as_coro(fn):
    result = fn()
    return await result if inspect.isawaitable(result) else result


@pytest.fixture
def server(tiny_model: ASRModel) -> Iterator[RunningServer]:
    running = RunningServer(
        tiny_model, ServerConfig(port=0, max_streams=3, idle_timeout_s=20, resume_ttl_s=0.5, max_message_bytes=1 << 16)
    )
    yield running
    running.stop()


def _audio(path: Path) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(str(path), dtype="float32")
    return samples, rate


def _stream(url: str, samples: np.ndarray, rate: int, sizes=(3000, 777, 4410), close: bool = True):
    """Send f32le audio in varied chunk sizes; return (finals, partials, close code)."""
    finals, partials = [], []
    with connect(f"{url}{P.STREAM_PATH}?sample_rate={rate}&encoding=f32le", max_size=None) as ws:
        ready = json.loads(ws.recv())
        assert ready["type"] == "ready" and ready["sample_rate"] == rate and ready["resume_token"]
        i, k = 0, 0
        while i < len(samples):
            n = sizes[k % len(sizes)]
            ws.send(P.encode_audio(samples[i : i + n], "f32le"))
            i, k = i + n, k + 1
        if not close:
            return finals, partials, ready
        ws.send(json.dumps({"type": "close"}))
        for raw in ws:
            message = json.loads(raw)
            (finals if message["type"] == "final" else partials).append(message)
        return finals, partials, ws.protocol.close_code


def _offline(model: ASRModel, path: Path, search: BeamSearch | None = None) -> list[dict]:
    transcript = transcribe_file(path, model, rescorer=SegmentRescorer(search) if search else None)
    return [{"segment": s.id, "text": s.text, "start": s.start, "end": s.end} for s in transcript.segments]


def _strip(finals: list[dict]) -> list[dict]:
    return [{k: f[k] for k in ("segment", "text", "start", "end")} for f in finals]


def test_native_finals_equal_offline_transcript(server, tiny_model, speech_wav: Path) -> None:
    samples, rate = _audio(speech_wav)  # 22.05 kHz: the server resamples in streaming
    half = len(samples) // 2
    finals, partials = [], []
    with connect(f"{server.url}{P.STREAM_PATH}?sample_rate={rate}&encoding=f32le") as ws:
        assert json.loads(ws.recv())["type"] == "ready"
        for i in range(0, half, 3000):
            ws.send(P.encode_audio(samples[i : min(i + 3000, half)], "f32le"))
        while not partials:  # the first half's partial, before the rest and the close (sent all at once,
            message = json.loads(ws.recv(timeout=30))  # the audio could otherwise be done in one batch)
            (finals if message["type"] == "final" else partials).append(message)
        for i in range(half, len(samples), 4410):
            ws.send(P.encode_audio(samples[i : i + 4410], "f32le"))
        ws.send(P.close_message())
        for message in map(json.loads, ws):
            (finals if message["type"] == "final" else partials).append(message)
        code = ws.protocol.close_code
    assert code == P.CLOSE_NORMAL
    assert _strip(finals) == _offline(tiny_model, speech_wav) and finals
    assert all(set(f) == {"type", "segment", "text", "start", "end", "words"} for f in finals)
    assert all(set(w) == {"word", "start", "end", "conf"} for f in finals for w in f["words"])
    assert partials and all(p["type"] == "partial" for p in partials)
    texts = [p["text"] for p in partials]
    assert all(a != b for a, b in zip(texts, texts[1:], strict=False))  # only when the text changed


def test_concurrent_streams_closing_together_equal_offline(server, tiny_model, speech_wav: Path) -> None:
    """Three streams at once (the pool's capacity), with different chunkings, closing at about the same time:
    their closing frames share batched steps, and each stream's finals still equal the offline transcript."""
    samples, rate = _audio(speech_wav)
    sizes = [(3000, 777, 4410), (160,) * 3 + (15000,), (9999,)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda z: _stream(server.url, samples, rate, z), sizes))
    expected = _offline(tiny_model, speech_wav)
    for finals, _, code in results:
        assert code == P.CLOSE_NORMAL and _strip(finals) == expected


@pytest.mark.parametrize("lm_processes", [2, 0])
def test_finals_with_a_language_model_equal_offline(
    tiny_model, tiny_lm_dir: Path, speech_wav: Path, lm_processes: int
) -> None:
    """With an LM every final is decoded again by its beam search, exactly as `asr transcribe --lm` does,
    in worker processes or in the batcher thread; a stream's messages keep their order either way (no
    partial of a segment before the final of the one before it)."""
    search = BeamSearch(tiny_lm_dir, BeamConfig(lm_weight=3.0))
    running = RunningServer(tiny_model, ServerConfig(port=0, max_streams=2, lm_processes=lm_processes), search)
    try:
        samples, rate = _audio(speech_wav)
        messages = _messages(running.url, samples, rate)
    finally:
        running.stop()
    finals = [m for m in messages if m["type"] == "final"]
    expected = _offline(tiny_model, speech_wav, search)
    assert finals and _strip(finals) == expected
    assert expected != _offline(tiny_model, speech_wav)  # the LM changed the words
    lexicon = {line.split()[0] for line in (tiny_lm_dir / "lexicon.txt").read_text().splitlines()}
    assert {w["word"] for f in finals for w in f["words"]} <= lexicon
    finished = -1
    for m in messages:
        assert m["segment"] > finished, m  # nothing more about a segment once its final is out
        if m["type"] == "final":
            finished = m["segment"]


def test_results_wait_behind_finals_being_rescored(tiny_model) -> None:
    """A stream's later results (a partial, the next final, its close) are emitted only after an earlier
    final that is still being decoded by the LM pool, and a failed rescoring falls back to greedy's final."""
    seg = [Segment(i, float(i), i + 0.5, f"GREEDY{i}", (Word(f"GREEDY{i}", float(i), i + 0.5, 0.9),)) for i in range(3)]
    jobs = [RescoreJob(seg[i], 25 * i, torch.zeros(10, 29)) for i in range(3)]
    emitted: list[tuple] = []
    stream = Stream("s", "t", 0, 16000, P.StreamOptions(), lambda s, f, p, c: emitted.append((f, p, c)))

    async def run() -> None:
        engine = Engine(tiny_model, torch.device("cpu"), 1)
        first, second = Future(), Future()
        engine._emit_in_order(stream, [(jobs[0], first)], None, False)
        engine._emit_in_order(stream, [], seg[1], False)  # a partial of the next segment
        engine._emit_in_order(stream, [(jobs[1], second)], None, False)
        engine._emit_in_order(stream, [jobs[2].segment], None, True)
        await asyncio.sleep(0)
        assert emitted == []  # all wait behind the first final
        second.set_result([("LATER", 0, 3, 0.8)])
        first.set_exception(BrokenProcessPool("a pool process died"))
        await stream.in_order
        await engine.stop()

    asyncio.run(run())
    assert [([f.text for f in finals], partial, closed) for finals, partial, closed in emitted] == [
        (["GREEDY0"], None, False),  # rescoring failed: greedy's final, still in its place
        ([], seg[1], False),
        (["LATER"], None, False),
        (["GREEDY2"], None, True),
    ]
    assert emitted[2][0][0].start == 1.0  # the job's start frame 25 x 40 ms


def _messages(url: str, samples: np.ndarray, rate: int) -> list[dict]:
    """Every result message of one stream sent in small chunks and closed, in arrival order."""
    with connect(f"{url}{P.STREAM_PATH}?sample_rate={rate}&encoding=f32le") as ws:
        ws.recv()
        ws.send(json.dumps({"type": "config", "partial_interval_s": 0.04}))
        for i in range(0, len(samples), 1500):
            ws.send(P.encode_audio(samples[i : i + 1500], "f32le"))
        ws.send(json.dumps({"type": "close"}))
        return [m for m in map(json.loads, ws) if m["type"] in ("partial", "final")]


def test_vosk_protocol(server) -> None:
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(8000 * 3) * 3000).astype("<i2")
    with connect(server.url + P.VOSK_PATH) as ws:  # no config: 8 kHz, as Vosk
        frames = [audio[i : i + 4000].tobytes() for i in range(0, len(audio), 4000)]
        for frame in frames:
            ws.send(frame)
            reply = json.loads(ws.recv())
            assert set(reply) in ({"partial"}, {"result", "text"})
        ws.send('{"reset" : 1}')
        assert set(json.loads(ws.recv())) == {"result", "text"}
        ws.send('{"eof":1}')
        final = json.loads(ws.recv())
        assert set(final) == {"result", "text"}
        assert all(set(w) == {"word", "start", "end", "conf"} for w in final["result"])
        with pytest.raises(ConnectionClosed):
            ws.recv()
    with connect(server.url + P.VOSK_PATH) as ws:
        ws.send(json.dumps({"config": {"sample_rate": 16000}}))  # no reply, as Vosk
        ws.send(audio[:3200].tobytes())
        assert set(json.loads(ws.recv())) <= {"partial", "result", "text"}
        ws.send(json.dumps({"config": {"sample_rate": 16000}}))
        assert json.loads(ws.recv())["code"] == P.ERR_BAD_CONFIG  # only before audio


def _error_after(ws, send) -> dict:
    ws.send(send)
    return json.loads(ws.recv())


def test_bad_input_while_another_stream_runs(server, tiny_model, speech_wav: Path) -> None:
    samples, rate = _audio(speech_wav)
    result: dict = {}
    good = threading.Thread(target=lambda: result.update(out=_stream(server.url, samples, rate, sizes=(400,))))
    good.start()
    native = f"{server.url}{P.STREAM_PATH}"
    with connect(native + "?sample_rate=16000&encoding=pcm_s16le") as ws:
        assert json.loads(ws.recv())["type"] == "ready"
        assert _error_after(ws, "{not json")["code"] == P.ERR_BAD_JSON
        assert _error_after(ws, json.dumps({"type": "dance"}))["code"] == P.ERR_UNKNOWN_TYPE
        assert _error_after(ws, json.dumps({"type": "config", "pause_s": -1}))["code"] == P.ERR_BAD_CONFIG
        assert _error_after(ws, b"\x01\x02\x03")["code"] == P.ERR_BAD_AUDIO  # odd byte count
        ws.send(json.dumps({"type": "config", "pause_s": 0.5, "partial_interval_s": 0.1}))
        ws.send(json.dumps({"type": "flush"}))
    with connect(native + "?sample_rate=16000&encoding=f32le") as ws:
        ws.recv()
        nan = np.array([0.1, np.nan, 0.2], dtype="<f4").tobytes()
        assert _error_after(ws, nan)["code"] == P.ERR_BAD_AUDIO
        ws.send(b"\x00" * (1 << 17))  # over max_message_bytes
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd.code == P.CLOSE_TOO_BIG
    for query, status in [("sample_rate=96000", 400), ("sample_rate=abc", 400), ("encoding=mp3", 400)]:
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{native}?{query}")
        assert refused.value.response.status_code == status
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server.url}/nowhere")
    assert refused.value.response.status_code == 404
    good.join(120)
    finals, _, code = result["out"]
    assert code == P.CLOSE_NORMAL and _strip(finals) == _offline(tiny_model, speech_wav)


def test_concurrent_handshakes_past_capacity_get_503(server) -> None:
    """Nine handshakes at once for three slots: three streams open, six get HTTP 503 (none is accepted
    and then closed), and a failed handshake gives its slot back."""
    native = f"{server.url}{P.STREAM_PATH}?sample_rate=16000"
    barrier = threading.Barrier(9)

    def attempt(held: contextlib.ExitStack) -> int:
        barrier.wait()
        try:
            ws = held.enter_context(connect(native))
        except InvalidStatus as e:
            return e.response.status_code
        return json.loads(ws.recv())["type"] == "ready" and 101

    with contextlib.ExitStack() as held, ThreadPoolExecutor(9) as pool:
        outcomes = sorted(pool.map(lambda _: attempt(held), range(9)))
        assert outcomes == [101] * 3 + [503] * 6
    with pytest.raises(InvalidStatus) as refused:  # a plain GET, not a WebSocket upgrade: 426, slot kept free
        connect(native, additional_headers={"Upgrade": "nonsense"})
    assert refused.value.response.status_code != 101
    assert server.call(lambda: len(server.server._reserved)) == 0


class _Handshake:
    """A connection between its accepted handshake and its handler (websockets' own type is not needed)."""

    def respond(self, status: int, text: str) -> Response:
        return Response(status, "", Headers(), text.encode())


def test_accepted_handshakes_hold_their_slots(server) -> None:
    """Handshakes whose handlers have not run yet hold the slots: the next one past capacity is answered 503
    at once, instead of being accepted and then closed when its handler finds no slot."""
    request = Request(f"{P.STREAM_PATH}?sample_rate=16000", Headers())
    pending = [_Handshake() for _ in range(4)]

    async def handshakes() -> list:
        return [await server.server._process_request(c, request) for c in pending]

    answers = server.call(handshakes)
    assert answers[:3] == [None] * 3 and answers[3].status_code == 503
    accepted = Response(101, "Switching Protocols", Headers())

    async def respond(connections: list, response: Response) -> None:
        for c in connections:
            await server.server._process_response(c, request, response)

    server.call(lambda: respond(pending[:2], accepted))
    server.call(lambda: respond(pending[2:3], answers[3]))  # a failed handshake
    assert server.call(lambda: server.server._process_request(_Handshake(), request)) is None


def test_capacity_disconnect_and_resume(server, tiny_model, speech_wav: Path) -> None:
    native = f"{server.url}{P.STREAM_PATH}?sample_rate=16000"
    with contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(connect(native)).recv()
        with pytest.raises(InvalidStatus) as refused:
            connect(native)
        assert refused.value.response.status_code == 503
    # Dropped without a close message: kept 0.5 s for a resume, then freed.
    assert server.call(lambda: server.server.engine.active) == 3
    deadline = time.monotonic() + 10
    while server.call(lambda: server.server.engine.active) and time.monotonic() < deadline:
        time.sleep(0.05)  # the test waits for the server's TTL timer
    assert server.call(lambda: server.server.engine.active) == 0
    with connect(native + "&resume_token=nonsense") as ws:
        assert json.loads(ws.recv())["code"] == P.ERR_BAD_RESUME
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd.code == P.CLOSE_BAD_RESUME

    # A dropped stream resumed with its token continues with no context lost.
    samples, rate = _audio(speech_wav)
    half = len(samples) // 2
    _, _, ready = _stream(server.url, samples[:half], rate, close=False)
    assert _strip(_resume(server.url, ready, samples[half:], rate)) == _offline(tiny_model, speech_wav)


def _resume(url: str, ready: dict, samples: np.ndarray, rate: int) -> list[dict]:
    """Reconnect with the stream's resume token, send the rest of its audio, close; the finals."""
    query = f"?sample_rate={rate}&encoding=f32le&resume_token={ready['resume_token']}"
    with connect(f"{url}{P.STREAM_PATH}{query}") as ws:
        assert json.loads(ws.recv())["session"] == ready["session"]
        for i in range(0, len(samples), 4000):
            ws.send(P.encode_audio(samples[i : i + 4000], "f32le"))
        ws.send(json.dumps({"type": "close"}))
        return [m for m in map(json.loads, ws) if m["type"] == "final"]


def test_resume_reaching_another_worker_is_passed_on(tiny_model, speech_wav: Path, tmp_path: Path) -> None:
    """Two workers of `asr serve --workers 2`: a stream of worker 1 resumed through worker 0 continues
    on worker 1, with no context lost; a bad token of worker 1 gets worker 1's error through worker 0."""
    workers = [
        RunningServer(tiny_model, ServerConfig(port=0, max_streams=2, worker=i, workers=2, relay_dir=tmp_path))
        for i in range(2)
    ]
    try:
        samples, rate = _audio(speech_wav)
        half = len(samples) // 2
        _, _, ready = _stream(workers[1].url, samples[:half], rate, close=False)
        assert ready["resume_token"].startswith("w1-")
        finals = _resume(workers[0].url, ready, samples[half:], rate)
        assert _strip(finals) == _offline(tiny_model, speech_wav)
        assert workers[0].call(lambda: workers[0].server.engine.stats.audio_seconds) == 0  # all on worker 1
        for token in ("w1-nonsense", "w7-nonsense"):  # unknown to worker 1; no worker 7
            with connect(f"{workers[0].url}{P.STREAM_PATH}?sample_rate=16000&resume_token={token}") as ws:
                assert json.loads(ws.recv())["code"] == P.ERR_BAD_RESUME
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv()
                assert closed.value.rcvd.code == P.CLOSE_BAD_RESUME
    finally:
        for w in workers:
            w.stop()


def test_a_full_worker_passes_new_streams_to_one_with_room(tiny_model, speech_wav: Path, tmp_path: Path) -> None:
    """Two workers of one slot each: a new stream reaching the full worker runs on the other one (its resume
    token names that worker), finals equal offline; with both full, the handshake gets HTTP 503."""
    workers = [
        RunningServer(tiny_model, ServerConfig(port=0, max_streams=1, worker=i, workers=2, relay_dir=tmp_path))
        for i in range(2)
    ]
    try:
        samples, rate = _audio(speech_wav)
        native = f"{workers[0].url}{P.STREAM_PATH}?sample_rate={rate}&encoding=f32le"
        with connect(native) as first:
            assert json.loads(first.recv())["resume_token"].startswith("w0-")
            with connect(native) as second:
                assert json.loads(second.recv())["resume_token"].startswith("w1-")
                for i in range(0, len(samples), 4000):
                    second.send(P.encode_audio(samples[i : i + 4000], "f32le"))
                second.send(json.dumps({"type": "close"}))
                finals = [m for m in map(json.loads, second) if m["type"] == "final"]
                assert second.protocol.close_code == P.CLOSE_NORMAL
            assert _strip(finals) == _offline(tiny_model, speech_wav)
            assert workers[0].call(lambda: workers[0].server.engine.stats.audio_seconds) == 0  # ran on worker 1
            # an overflowed handshake that then fails towards its client gives worker 1's slot back
            request, handshake = Request(f"{P.STREAM_PATH}?sample_rate={rate}", Headers()), _Handshake()
            assert workers[0].call(lambda: workers[0].server._process_request(handshake, request)) is None
            assert workers[1].call(lambda: workers[1].server.engine.active) == 1
            failed = Response(500, "Internal Server Error", Headers())
            workers[0].call(lambda: workers[0].server._process_response(handshake, request, failed))
            for _ in range(100):  # worker 1 sees the relay close on its own loop
                if workers[1].call(lambda: workers[1].server.engine.active) == 0:
                    break
                time.sleep(0.05)
            assert workers[1].call(lambda: workers[1].server.engine.active) == 0
            with connect(f"{workers[1].url}{P.STREAM_PATH}?sample_rate={rate}") as third:  # worker 1 full now
                assert json.loads(third.recv())["resume_token"].startswith("w1-")
                for url in (workers[0].url, workers[1].url):
                    with pytest.raises(InvalidStatus) as refused:
                        connect(f"{url}{P.STREAM_PATH}?sample_rate={rate}")
                    assert refused.value.response.status_code == 503
        for w in workers:  # each counts the one 503 its client got, not the other's attempt to pass one on
            assert w.call(lambda w=w: w.server.metrics.rejected.labels(reason="capacity")._value.get()) == 1
    finally:
        for w in workers:
            w.stop()


def _metric(http: str, name: str) -> float:
    text = urllib.request.urlopen(f"{http}{P.METRICS_PATH}", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_step_process_default() -> None:
    """`--step-process` is on by default for several workers on a GPU, off on the CPU or for one worker, and
    `--step-process` / `--no-step-process` override it."""
    from asr.cli import build_parser, uses_step_process

    def uses(argv: list[str], device: str) -> bool:
        return uses_step_process(build_parser().parse_args(["serve", *argv]), torch.device(device))

    assert uses(["--workers", "4"], "cuda")
    assert not uses(["--workers", "4"], "cpu")
    assert not uses([], "cuda")
    assert not uses(["--workers", "4", "--no-step-process"], "cuda")
    assert uses(["--workers", "4", "--step-process"], "cpu")


@pytest.mark.parametrize("step_process", [False, True], ids=["own-steps", "step-process"])
def test_serve_with_workers(tiny_model_dir: Path, tiny_model, speech_wav: Path, step_process: bool) -> None:
    """`asr serve --workers 2` (with and without `--step-process`): one port, both workers take streams,
    /metrics counts both workers' streams, finals equal offline, and SIGTERM drains every worker."""
    cmd = [sys.executable, "-m", "asr", "serve", "--model", str(tiny_model_dir), "--port", "0", "--device", "cpu"]
    cmd += ["--workers", "2", "--max-streams", "8"] + (["--step-process"] if step_process else [])
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    try:
        line = proc.stdout.readline()
        assert "2 workers" in line, line
        url = line.split()[2].removesuffix("/v1/stream")
        http = url.replace("ws://", "http://")
        samples, rate = _audio(speech_wav)
        with contextlib.ExitStack() as held:
            seen: dict[str, object] = {}
            for _ in range(60):  # the kernel picks the worker: connect until each worker holds one stream
                ws = held.enter_context(connect(f"{url}{P.STREAM_PATH}?sample_rate={rate}&encoding=f32le"))
                worker = json.loads(ws.recv())["resume_token"][:3]
                if worker in seen:  # close it again, so that no worker runs out of slots
                    ws.send(json.dumps({"type": "close"}))
                    list(ws)
                    continue
                seen[worker] = ws
                if len(seen) == 2:
                    break
            assert sorted(seen) == ["w0-", "w1-"]
            assert _metric(http, "asr_active_streams") == 2
            ws = seen["w1-"]
            for i in range(0, len(samples), 4000):
                ws.send(P.encode_audio(samples[i : i + 4000], "f32le"))
            proc.send_signal(signal.SIGTERM)
            finals = [m for m in map(json.loads, ws) if m["type"] == "final"]
            assert ws.protocol.close_code == P.CLOSE_NORMAL
        assert _strip(finals) == _offline(tiny_model, speech_wav)
        assert proc.wait(60) == 0
        assert "drained" in proc.stdout.read()
    finally:
        proc.kill()


def test_token_and_origin(tiny_model) -> None:
    running = RunningServer(tiny_model, ServerConfig(port=0, token="s3cret", allowed_origins=("https://ok.example",)))
    try:
        native = f"{running.url}{P.STREAM_PATH}"
        for url, headers, status in [
            (native, None, 401),
            (native + "?token=wrong", None, 401),
            (native, {"Authorization": "Bearer wrong"}, 401),
            (native + "?token=s3cret", {"Origin": "https://evil.example"}, 403),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                connect(url, additional_headers=headers)
            assert refused.value.response.status_code == status
        for url, headers in [(native + "?token=s3cret", None), (native, {"Authorization": "Bearer s3cret"})]:
            with connect(url, additional_headers=headers) as ws:
                assert json.loads(ws.recv())["type"] == "ready"
        metrics = urllib.request.urlopen(running.http + P.METRICS_PATH).read().decode()
        assert 'asr_rejected_connections_total{reason="auth"} 3.0' in metrics
        assert 'asr_rejected_connections_total{reason="origin"} 1.0' in metrics
        assert urllib.request.urlopen(running.http + P.HEALTH_PATH).read() == b"ok\n"
    finally:
        running.stop()


def test_sigterm_drain_delivers_finals(tiny_model_dir: Path, speech_wav: Path) -> None:
    cmd = [sys.executable, "-m", "asr", "serve", "--model", str(tiny_model_dir), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    try:
        line = proc.stdout.readline()
        url = line.split()[2].removesuffix("/v1/stream")
        samples, rate = _audio(speech_wav)
        with connect(f"{url}{P.STREAM_PATH}?sample_rate={rate}&encoding=f32le") as ws:
            ws.recv()
            for i in range(0, len(samples), 4000):
                ws.send(P.encode_audio(samples[i : i + 4000], "f32le"))
            proc.send_signal(signal.SIGTERM)
            messages = [json.loads(m) for m in ws]
            assert ws.protocol.close_code == P.CLOSE_NORMAL
        assert [m for m in messages if m["type"] == "final"]
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_stream_and_mic_commands(server, speech_wav: Path, capsys, monkeypatch) -> None:
    from asr.cli import main

    assert main(["stream", str(speech_wav), "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "\r" in out and "] " in out  # partials overwrite a line; finals carry their times
    assert main(["stream", str(speech_wav), "--url", "ws://127.0.0.1:9"]) == 2
    assert "cannot stream to ws://127.0.0.1:9" in capsys.readouterr().err

    import sounddevice as sd

    def no_device(kind=None):
        raise sd.PortAudioError("Error querying device -1")

    monkeypatch.setattr(sd, "query_devices", no_device)
    assert main(["mic", "--url", server.url]) == 2
    assert "no audio input device found" in capsys.readouterr().err


def test_idle_timeout_and_fast_sender_is_slowed(tiny_model) -> None:
    config = ServerConfig(port=0, idle_timeout_s=0.5, max_speed=2.0, burst_s=0.5, max_message_bytes=1 << 20)
    running = RunningServer(tiny_model, config)
    try:
        native = f"{running.url}{P.STREAM_PATH}?sample_rate=16000&encoding=f32le"
        with connect(native) as ws:
            ws.recv()
            assert json.loads(ws.recv())["code"] == P.ERR_IDLE  # nothing sent for 0.5 s
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv()
            assert closed.value.rcvd.code == P.CLOSE_IDLE
        audio = np.zeros(16000 * 4, np.float32)  # 4 s of audio, sent as fast as possible
        with connect(native) as ws:
            ws.recv()
            start = time.monotonic()
            for i in range(0, len(audio), 1600):
                ws.send(P.encode_audio(audio[i : i + 1600], "f32le"))
            ws.send(json.dumps({"type": "close"}))
            list(ws)
            # At most 2x real time after a 0.5 s burst: 4 s of audio takes at least 4 / 2 - 0.5 s.
            assert time.monotonic() - start >= 1.4
    finally:
        running.stop()


def test_vosk_messages_are_lower_case() -> None:
    from asr.decoding import Segment, Word

    seg = Segment(0, 0.1, 0.9, "HELLO THERE", (Word("HELLO", 0.1, 0.4, 0.9), Word("THERE", 0.5, 0.9, 0.8)))
    result = json.loads(P.vosk_result([seg]))
    assert result["text"] == "hello there" and [w["word"] for w in result["result"]] == ["hello", "there"]
    assert json.loads(P.vosk_partial("HEL")) == {"partial": "hel"}


def test_health_reports_a_dead_batcher(tiny_model, monkeypatch) -> None:
    running = RunningServer(tiny_model, ServerConfig(port=0))
    try:
        engine = running.server.engine

        def broken(commands, loop):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "_process", broken)
        with connect(f"{running.url}{P.STREAM_PATH}") as ws:
            ws.recv()
            ws.send(b"\x00\x00" * 160)
            deadline = time.monotonic() + 10
            while engine.failure is None and time.monotonic() < deadline:
                time.sleep(0.02)  # the test waits for the batcher task to end
        with pytest.raises(urllib.error.HTTPError) as status:
            urllib.request.urlopen(running.http + P.HEALTH_PATH)
        assert status.value.code == 503 and b"boom" in status.value.read()
    finally:
        running.stop()
