"""`asr serve`: the WebSocket server (websockets.asyncio). The event loop only receives and sends;
the engine's batcher does all compute. Protocol: streaming/protocol.py and docs/protocol.md.

With `asr serve --workers N` (streaming/workers.py), N of these servers share one port
(SO_REUSEPORT), each with its own engine and 1/N of the slots. A resume that reaches a worker
other than its stream's is passed through to that worker over a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import os
import re
import signal
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Request, Response

from asr.decoding import Segment
from asr.lm import BeamSearch
from asr.model import ASRModel
from streaming import protocol as P
from streaming.compute import Compute
from streaming.engine import CapacityError, Command, Engine, Stream

HANDSHAKE_TIMEOUT_S = 10.0  # websockets' open_timeout: a handshake not done by then has failed
_TOKEN_WORKER = re.compile(r"w(\d+)-")  # resume tokens of worker i start with "w<i>-"
_RELAYED_HEADERS = ("authorization", "origin")


def relay_socket(relay_dir: Path, worker: int) -> Path:
    """The Unix socket on which worker `worker` takes resumes passed on by the other workers."""
    return relay_dir / f"worker-{worker}.sock"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_streams: int = 64
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    idle_timeout_s: float = 30.0
    max_message_bytes: int = 1 << 20
    resume_ttl_s: float = 30.0
    max_speed: float = 8.0  # x real time a client may send, after a burst allowance
    burst_s: float = 10.0
    max_backlog_s: float = 10.0  # unprocessed audio per stream before its reads pause
    worker: int = 0  # this server's index among `workers` processes sharing the port
    workers: int = 1
    relay_dir: Path | None = None  # workers > 1: where the workers' relay sockets live
    lm_processes: int = 2  # with a language model: processes that decode finals again (0: the batcher thread)


@dataclass
class Session:
    """Loop-side state of one stream: its outgoing messages outlive a dropped connection."""

    stream: Stream
    vosk: bool = False
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # str messages; None after the last
    replies: asyncio.Queue = field(default_factory=asyncio.Queue)  # vosk: one per processed frame
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0
    started: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.active = Gauge(
            "asr_active_streams", "Streams holding a state slot", registry=self.registry, multiprocess_mode="livesum"
        )
        self.batch = Gauge(
            "asr_batch_size",
            "Streams in the last batched model step",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.step = Histogram(
            "asr_step_seconds",
            "Latency of one batched model step",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=self.registry,
        )
        self.rtf = Gauge(
            "asr_real_time_factor",
            "Compute seconds per audio second so far",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.rejected = Counter("asr_rejected_connections", "Refused handshakes", ["reason"], registry=self.registry)

    def exposition(self) -> bytes:
        """Prometheus text: this process's metrics, or under several workers (PROMETHEUS_MULTIPROC_DIR
        set), all workers' together: counts and histograms summed, active streams summed over live
        workers, batch size and real-time factor per worker (label `pid`)."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class ASRServer:
    def __init__(
        self,
        model: ASRModel,
        device,
        config: ServerConfig,
        model_info: dict,
        search: BeamSearch | None = None,
        compute: Compute | None = None,
    ) -> None:
        """With `search`, every final is decoded again with its language model (partials stay greedy). `compute`
        runs the model (default: in this process, on `device`; see streaming.compute)."""
        self.model, self.device, self.config, self.model_info = model, device, config, model_info
        self.search = search
        self.compute = compute
        self.metrics = Metrics()
        self.sessions: dict[str, Session] = {}  # by resume token
        self.handlers: set[asyncio.Task] = set()
        self.engine: Engine | None = None
        self.server: Server | None = None
        self.relay_server: Server | None = None
        self.draining = False
        self._reserved: dict[ServerConnection, float] = {}  # handshakes holding a slot -> since (monotonic)
        self._overflowed: dict[ServerConnection, ClientConnection] = {}  # accepted for another worker's slot

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> Server:
        c = self.config
        prefix = f"w{c.worker}-" if c.workers > 1 else ""
        self.engine = Engine(
            self.model, self.device, c.max_streams, self._on_step, self.search, prefix, c.lm_processes, self.compute
        )
        self.engine.start()
        tls = None
        if c.tls_cert is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(c.tls_cert, c.tls_key)
        self.server = await serve(
            self._handle,
            c.host,
            c.port,
            process_request=self._process_request,
            process_response=self._process_response,
            open_timeout=HANDSHAKE_TIMEOUT_S,
            max_size=c.max_message_bytes,
            compression=None,  # permessage-deflate: audio does not compress, and inflating it cost CPU per frame
            ssl=tls,
            reuse_port=c.workers > 1 or None,
        )
        if c.workers > 1:
            self.relay_server = await unix_serve(
                self._handle,
                str(relay_socket(c.relay_dir, c.worker)),
                process_request=functools.partial(self._process_request, public=False),
                process_response=self._process_response,
                open_timeout=HANDSHAKE_TIMEOUT_S,
                max_size=c.max_message_bytes,
                compression=None,
            )
        return self.server

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def run_until_signal(self, on_ready=None) -> None:
        """Serve until SIGTERM or SIGINT, then drain: finals to every open stream, then exit."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            on_ready(self)
        await stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Stop accepting, close every stream with its finals, wait for the connections to end."""
        self.draining = True
        self.server.close(close_connections=False)
        if self.relay_server is not None:
            self.relay_server.close(close_connections=False)
        for session in list(self.sessions.values()):
            if session.expiry is not None:  # detached: nobody to send finals to
                self._expire(session)
            else:
                self.engine.submit(Command(session.stream, "close"))
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=30)
        await self.server.wait_closed()
        await self.engine.stop()

    # ------------------------------------------------------------ HTTP side of the handshake

    def _refuse(
        self, connection: ServerConnection, status: HTTPStatus, reason: str, why: str, public: bool
    ) -> Response:
        """An HTTP refusal, counted in the metrics if a client gets it (`public`; a refusal of a handshake that
        another worker passed on is that worker's to report)."""
        if public:
            self.metrics.rejected.labels(reason=reason).inc()
        return connection.respond(status, why + "\n")

    async def _process_request(
        self, connection: ServerConnection, request: Request, public: bool = True
    ) -> Response | None:
        """Health, metrics, then the checks of a stream's handshake. A new stream on a worker whose slots are
        all taken goes to another worker with room (`_overflow`); HTTP 503 only if every worker is full. A
        handshake passed on by another worker (not `public`: a resume or an overflow) goes no further."""
        refused = self._admit(connection, request, public)
        if refused is not None or not _needs_slot(request) or self._reserve(connection):
            return refused
        if public and self.config.workers > 1 and await self._overflow(connection, request):
            return None
        busy = "all stream slots are busy"
        return self._refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "capacity", busy, public)

    def _admit(self, connection: ServerConnection, request: Request, public: bool) -> Response | None:
        """The response to a request that gets no stream (health, metrics, refusals), else None."""
        path = request.path.split("?", 1)[0]
        if path == P.HEALTH_PATH:
            if self.engine.failure is not None:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"batcher failed: {self.engine.failure!r}\n")
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == P.METRICS_PATH:
            return self._metrics_response(connection)
        if path not in (P.STREAM_PATH, P.VOSK_PATH):
            return self._refuse(connection, HTTPStatus.NOT_FOUND, "path", f"no endpoint at {path}", public)
        origin = request.headers.get("Origin")
        if self.config.allowed_origins and origin is not None and origin not in self.config.allowed_origins:
            return self._refuse(connection, HTTPStatus.FORBIDDEN, "origin", f"origin {origin} is not allowed", public)
        if self.config.token is not None and not self._authorized(request):
            return self._refuse(connection, HTTPStatus.UNAUTHORIZED, "auth", "missing or wrong token", public)
        if self.draining:
            draining = "server is shutting down"
            return self._refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining", draining, public)
        if path == P.STREAM_PATH:
            try:
                P.parse_stream_url(request.path)
            except P.ProtocolError as e:
                return self._refuse(connection, HTTPStatus.BAD_REQUEST, "bad_params", e.message, public)
        return None

    async def _overflow(self, connection: ServerConnection, request: Request) -> bool:
        """Open the stream on the first other worker with a free slot (through its relay socket), to be passed
        through by `_handle`; False if every other worker is full too."""
        c = self.config
        for worker in [(c.worker + i) % c.workers for i in range(1, c.workers)]:
            try:
                self._overflowed[connection] = await self._connect_worker(worker, request)
                return True
            except (OSError, InvalidHandshake, TimeoutError):  # full (503), draining or gone: try the next
                continue
        return False

    async def _connect_worker(self, worker: int, request: Request) -> ClientConnection:
        """A WebSocket connection to another worker's relay socket with this request's path and credentials."""
        headers = [(k, v) for k, v in request.headers.raw_items() if k.lower() in _RELAYED_HEADERS]
        return await unix_connect(
            str(relay_socket(self.config.relay_dir, worker)),
            uri=f"ws://localhost{request.path}",
            additional_headers=headers,
            max_size=self.config.max_message_bytes,
            open_timeout=HANDSHAKE_TIMEOUT_S,
            compression=None,
        )

    def _reserve(self, connection: ServerConnection) -> bool:
        """Hold a slot for an accepted handshake until its handler opens the stream, so that concurrent
        handshakes past capacity get HTTP 503, not an accepted connection closed at once. A handshake
        that fails later lets its slot go in `_process_response`, or once it is older than the
        handshake timeout."""
        now = time.monotonic()
        for stale in [c for c, since in self._reserved.items() if now - since > HANDSHAKE_TIMEOUT_S]:
            del self._reserved[stale]
        if len(self.engine.free) <= len(self._reserved):
            return False
        self._reserved[connection] = now
        return True

    async def _process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            self._reserved.pop(connection, None)
            upstream = self._overflowed.pop(connection, None)
            if upstream is not None:  # the client's handshake failed after all: the other worker frees the slot
                vosk = request.path.startswith(P.VOSK_PATH)
                with contextlib.suppress(ConnectionClosed):
                    await upstream.send(P.vosk_eof() if vosk else P.close_message())
                await upstream.close()

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("Authorization", "")
        offered = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        if offered is None:
            offered = P.query_token(request.path)
        return offered is not None and hmac.compare_digest(offered.encode(), self.config.token.encode())

    def _on_step(self, seconds: float, batch: int) -> None:
        """Batcher thread: prometheus_client metrics are thread-safe."""
        self.metrics.step.observe(seconds)
        self.metrics.batch.set(batch)
        stats = self.engine.stats
        if stats.audio_seconds:
            self.metrics.rtf.set(stats.compute_seconds / stats.audio_seconds)

    def _metrics_response(self, connection: ServerConnection) -> Response:
        return connection.respond(HTTPStatus.OK, self.metrics.exposition().decode())

    # ------------------------------------------------------------ WebSocket side

    async def _handle(self, connection: ServerConnection) -> None:
        self._reserved.pop(connection, None)  # the stream opens now, in this same loop iteration
        task = asyncio.current_task()
        self.handlers.add(task)
        try:
            upstream = self._overflowed.pop(connection, None)
            if upstream is not None:
                await _pipe(connection, upstream)
            elif connection.request.path.startswith(P.VOSK_PATH):
                await self._vosk(connection)
            else:
                await self._native(connection, P.parse_stream_url(connection.request.path))
        finally:
            self.handlers.discard(task)

    def _emit(self, stream: Stream, finals: list[Segment], partial: Segment | None, closed: bool) -> None:
        """Called on the loop by the batcher with a stream's new results."""
        session = self.sessions.get(stream.resume_token)
        if session is None:
            return
        if session.vosk:
            session.replies.put_nowait((finals, partial, closed))
        else:
            for seg in finals:
                session.out.put_nowait(P.final(seg))
            if partial is not None:
                session.out.put_nowait(P.partial(partial))
        if closed:
            session.out.put_nowait(None)
            self._forget(session)

    def _open(self, sample_rate: int, vosk: bool) -> Session:
        stream = self.engine.open(sample_rate, P.StreamOptions(), self._emit, always_reply=vosk)
        session = Session(stream, vosk=vosk)
        stream.on_drained = session.drained.set
        self.sessions[stream.resume_token] = session
        self.metrics.active.set(self.engine.active)  # kept current: other workers' scrapes read it
        return session

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.stream.resume_token, None)
        self.engine.release(session.stream)
        self.metrics.active.set(self.engine.active)

    def _expire(self, session: Session) -> None:
        session.expiry = None
        self._forget(session)

    async def _native(self, connection: ServerConnection, params: P.StreamParams) -> None:
        owner = self._owner(params.resume_token)
        if owner is not None and owner != self.config.worker:
            await self._relay(connection, owner)
            return
        session = await self._attach(connection, params)
        if session is None:
            return
        stream = session.stream
        ready = P.ready(stream.id, stream.resume_token, self.model_info, stream.sample_rate)
        await connection.send(ready)
        sender = asyncio.create_task(self._send_loop(connection, session))
        try:
            await self._receive_loop(connection, session, params.encoding)
        except ConnectionClosed:
            if not stream.closed:  # dropped mid-stream: keep the state for a resume
                session.expiry = asyncio.get_running_loop().call_later(self.config.resume_ttl_s, self._expire, session)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender

    def _owner(self, resume_token: str | None) -> int | None:
        """The worker whose stream a resume token names (None: not a resume, or a single server)."""
        match = _TOKEN_WORKER.match(resume_token or "")
        if self.config.workers == 1 or match is None or int(match[1]) >= self.config.workers:
            return None
        return int(match[1])

    async def _relay(self, client: ServerConnection, worker: int) -> None:
        """A resume of another worker's stream: connect to that worker and pass messages both ways
        until either side closes; the other side is closed with the same code and reason."""
        try:
            upstream = await self._connect_worker(worker, client.request)
        except (OSError, InvalidHandshake, TimeoutError) as e:
            await client.send(P.error(P.ERR_BAD_RESUME, f"the stream's worker {worker} cannot be reached: {e}"))
            await client.close(P.CLOSE_BAD_RESUME, "bad resume token")
            return
        await _pipe(client, upstream)

    async def _attach(self, connection: ServerConnection, params: P.StreamParams) -> Session | None:
        if params.resume_token is None:
            try:
                return self._open(params.sample_rate, vosk=False)
            except CapacityError as e:
                await connection.close(P.CLOSE_GOING_AWAY, str(e))
                return None
        session = self.sessions.get(params.resume_token)
        if session is None or session.expiry is None or session.vosk:
            await connection.send(P.error(P.ERR_BAD_RESUME, "unknown, expired or still-connected resume token"))
            await connection.close(P.CLOSE_BAD_RESUME, "bad resume token")
            return None
        session.expiry.cancel()
        session.expiry = None
        return session

    async def _send_loop(self, connection: ServerConnection, session: Session) -> None:
        while (message := await session.out.get()) is not None:
            await connection.send(message)
        await connection.close(P.CLOSE_NORMAL, "stream closed")

    async def _recv(self, connection: ServerConnection) -> str | bytes:
        try:
            async with asyncio.timeout(self.config.idle_timeout_s):
                return await connection.recv()
        except TimeoutError:
            await connection.send(P.error(P.ERR_IDLE, f"no message for {self.config.idle_timeout_s:g} s"))
            await connection.close(P.CLOSE_IDLE, "idle timeout")
            raise

    async def _receive_loop(self, connection: ServerConnection, session: Session, encoding: str) -> None:
        stream = session.stream
        while not stream.closed:
            try:
                message = await self._recv(connection)
            except TimeoutError:
                self.engine.submit(Command(stream, "close"))
                return
            try:
                if isinstance(message, bytes):
                    await self._audio(session, P.decode_audio(message, encoding))
                    continue
                command = P.parse_client_message(message)
                if isinstance(command, P.Configure):
                    options = stream.options.updated(command.changes)
                    self.engine.submit(Command(stream, "configure", options=options))
                elif isinstance(command, P.Flush):
                    self.engine.submit(Command(stream, "flush"))
                else:
                    self.engine.submit(Command(stream, "close"))
                    await connection.wait_closed()  # the send loop closes after the last final
                    return
            except P.ProtocolError as e:
                await connection.send(P.error(e.code, e.message))

    async def _audio(self, session: Session, samples: np.ndarray) -> None:
        """Enqueue audio; pace a client that sends faster than max_speed x real time or whose
        unprocessed backlog is over max_backlog_s, so memory stays bounded."""
        stream, c = session.stream, self.config
        session.received += len(samples)
        ahead = session.received / stream.sample_rate / c.max_speed - (time.monotonic() - session.started) - c.burst_s
        if ahead > 0:
            await asyncio.sleep(ahead)  # rate limit, not a poll
        while stream.backlog > c.max_backlog_s * stream.sample_rate:
            session.drained.clear()
            await session.drained.wait()
        self.engine.submit(Command(stream, "audio", audio=samples))

    # ------------------------------------------------------------ Vosk

    async def _vosk(self, connection: ServerConnection) -> None:
        try:
            session = self._open(P.VOSK_DEFAULT_RATE, vosk=True)
        except CapacityError as e:
            await connection.close(P.CLOSE_GOING_AWAY, str(e))
            return
        stream = session.stream
        try:
            while True:
                message = await self._recv(connection)
                reply, done = await self._vosk_message(session, message)
                if reply is not None:
                    await connection.send(reply)
                if done:
                    await connection.close(P.CLOSE_NORMAL, "eof")
                    return
        except (ConnectionClosed, TimeoutError):
            if not stream.closed:
                self.engine.submit(Command(stream, "close"))

    async def _vosk_message(self, session: Session, message: str | bytes) -> tuple[str | None, bool]:
        """(reply or None, whether the stream ended). Like the Vosk server, config gets no reply."""
        stream = session.stream
        if isinstance(message, bytes):
            try:
                await self._audio(session, P.decode_audio(message, "pcm_s16le"))
            except P.ProtocolError as e:
                return P.error(e.code, e.message), False
            finals, partial, _ = await session.replies.get()
            if finals:
                return P.vosk_result(finals), False
            return P.vosk_partial(partial.text if partial is not None else ""), False
        try:
            command = P.parse_vosk_message(message)
        except P.ProtocolError as e:
            return P.error(e.code, e.message), False
        if isinstance(command, P.VoskConfig):
            if session.received:
                return P.error(P.ERR_BAD_CONFIG, "sample_rate can only be set before the first audio"), False
            stream.sample_rate = command.sample_rate
            self.engine.submit(Command(stream, "reset"))
            return None, False
        kind = "close" if isinstance(command, P.VoskEof) else "flush"
        self.engine.submit(Command(stream, kind))
        finals, _, _ = await session.replies.get()
        return P.vosk_result(finals), kind == "close"


def _needs_slot(request: Request) -> bool:
    """Whether a handshake that passed `_admit` opens a new stream (a native stream that is not a resume, or Vosk)."""
    path = request.path.split("?", 1)[0]
    if path == P.STREAM_PATH:
        return P.parse_stream_url(request.path).resume_token is None
    return path == P.VOSK_PATH


async def _pipe(client: ServerConnection, upstream: ClientConnection) -> None:
    """Pass messages both ways until either side closes; the other side is closed with the same code and reason."""
    async with upstream:
        await asyncio.gather(_pass_on(client, upstream), _pass_on(upstream, client))


async def _pass_on(source: ServerConnection | ClientConnection, sink: ServerConnection | ClientConnection) -> None:
    """Copy messages from `source` to `sink` until `source` closes, then close `sink` the same way."""
    with contextlib.suppress(ConnectionClosed):
        async for message in source:
            await sink.send(message)
    code = source.close_code if source.close_code not in (None, 1005, 1006) else P.CLOSE_GOING_AWAY
    await sink.close(code, source.close_reason or "")
