"""`asr serve --workers N`: N server processes on one port, so that one GPU serves more streams
than one Python interpreter can feed.

Each worker is a whole `ASRServer` (event loop, engine, batcher, its own share of the slots and
its own CUDA graphs) bound to the same port with SO_REUSEPORT; the kernel spreads new connections
over them. Resume tokens name their worker, and a resume that reaches another worker is passed
through to the right one over a Unix socket (`ASRServer._relay`), so a client never notices. The
workers' Prometheus metrics are merged (prometheus_client's multiprocess mode), so `/metrics` on
any worker describes the whole server.

With `step_process`, one more process owns the model and the state pool of every worker and runs
all their model steps, batched together (`streaming.compute`): the workers keep the network, the
audio, the decoding and the language model, and send it features requests and step requests.

The parent process only starts the processes, waits for them, and passes SIGTERM and SIGINT on to
the workers: each worker drains its own streams (through the step process, which ends once every
worker has hung up). If a worker or the step process dies on its own, the workers are drained (or
killed after `KILL_AFTER_S` if they cannot drain) and the parent exits with 1, for a supervisor to
restart the service.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from prometheus_client import multiprocess

from streaming.compute import RemoteCompute, SharedBuffers, StepPlan, StepSpec, run_step_process

START_TIMEOUT_S = 600.0  # loading the model and capturing CUDA graphs, per worker
KILL_AFTER_S = 30.0  # after a process died unasked, how long the others have to drain


class WorkerError(Exception):
    """A worker failed to start."""


@dataclass(frozen=True)
class WorkerPlan:
    """What worker `index` of `count` needs besides the command-line arguments."""

    index: int
    count: int
    port: int
    relay_dir: Path
    max_streams: int  # this worker's slots
    compute: RemoteCompute | None = None  # its side of the step process, if there is one


def _worker(build: Callable, args, plan: WorkerPlan, ready: Connection) -> None:
    """Process entry: build this worker's server and run it until SIGTERM or SIGINT."""
    import asyncio

    import torch

    if plan.compute is not None:
        torch.set_num_threads(1)  # small CPU tensors only; the workers are the parallelism
    server = build(args, plan)

    def started(_server) -> None:
        ready.send(plan.index)
        ready.close()

    asyncio.run(server.run_until_signal(started))


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket that holds the port, a free one if `port` is 0,
    while the workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    return holder


def run_workers(
    build: Callable, args, count: int, on_ready: Callable[[int], None], step: StepSpec | None = None
) -> int:
    """Run `count` workers of `build(args, plan) -> ASRServer` on `args.host`/`args.port`; with `step`, first
    the step process that runs their model steps.

    `on_ready(port)` is called once every worker listens. Returns the exit code: 0 after a drain,
    1 if a worker or the step process died on its own.
    """
    relay_dir = Path(tempfile.mkdtemp(prefix="asr-serve-"))
    metrics_dir = relay_dir / "metrics"
    metrics_dir.mkdir()
    previous_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # inherited by the spawned workers
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    procs: list[mp.Process] = []
    stepper: mp.Process | None = None
    try:
        with _reserve_port(args.host, args.port) as holder:
            port = holder.getsockname()[1]
            per_worker = -(-args.max_streams // count)
            computes: list[RemoteCompute | None] = [None] * count
            if step is not None:
                stepper, computes = _start_step_process(ctx, step, count, per_worker)
            readies = []
            for i in range(count):
                receive, send = ctx.Pipe(duplex=False)
                plan = WorkerPlan(i, count, port, relay_dir, per_worker, computes[i])
                proc = ctx.Process(target=_worker, args=(build, args, plan, send), name=f"asr-serve-{i}")
                proc.start()
                send.close()
                if computes[i] is not None:
                    computes[i].conn.close()  # the worker has its own copy now
                procs.append(proc)
                readies.append(receive)
            _wait_ready(procs, readies)
        on_ready(port)
        return _supervise(procs, stepper)
    finally:
        for proc in [*procs, *([stepper] if stepper is not None else [])]:
            if proc.is_alive():
                proc.kill()
            proc.join()
            multiprocess.mark_process_dead(proc.pid)
        shutil.rmtree(relay_dir, ignore_errors=True)
        if previous_env is None:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous_env


def _start_step_process(ctx, step: StepSpec, count: int, per_worker: int):
    """Start the step process and wait until it has its model and graphs; returns it and each worker's
    RemoteCompute (whose pipe end the parent closes once that worker has started)."""
    pairs = [ctx.Pipe() for _ in range(count)]
    buffers = [SharedBuffers.allocate(per_worker, step.vocab_size) for _ in range(count)]
    plan = StepPlan(step, per_worker, [theirs for theirs, _ in pairs], buffers)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_step_process, args=(plan, send), name="asr-serve-steps")
    proc.start()
    send.close()
    for theirs, _ in pairs:
        theirs.close()  # the step process has its own copies: it sees a worker hang up only if we close ours
    _wait_ready([proc], [receive])
    return proc, [RemoteCompute(mine, b) for (_, mine), b in zip(pairs, buffers, strict=True)]


def _wait_ready(procs: list[mp.Process], readies: list[Connection]) -> None:
    pending = {r: p for r, p in zip(readies, procs, strict=True)}
    while pending:
        ready = wait([*pending, *(p.sentinel for p in pending.values())], timeout=START_TIMEOUT_S)
        if not ready:
            raise WorkerError(f"{len(pending)} worker(s) did not start within {START_TIMEOUT_S:g} s")
        for r in [r for r in pending if r in ready]:
            try:
                r.recv()
            except EOFError as e:  # the worker died before it listened
                raise WorkerError(f"{pending[r].name} exited with {pending[r].exitcode} while starting") from e
            del pending[r]
        dead = [p for p in pending.values() if p.sentinel in ready]
        if dead:
            raise WorkerError(f"{dead[0].name} exited with {dead[0].exitcode} while starting")


def _supervise(procs: list[mp.Process], stepper: mp.Process | None = None) -> int:
    """Pass SIGTERM/SIGINT on to the workers; wait for every process. 1 if one died unasked: then the workers
    are drained, and killed if they are not done within KILL_AFTER_S."""
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed = False
        everyone = [*procs, *([stepper] if stepper is not None else [])]
        alive = list(everyone)
        while alive:
            ended = wait([p.sentinel for p in alive], timeout=KILL_AFTER_S if failed else None)
            if not ended:  # could not drain in time (their steps need the process that died)
                for proc in alive:
                    proc.kill()
            for proc in [p for p in alive if p.sentinel in ended or not ended]:
                proc.join()
                alive.remove(proc)
                if proc.exitcode != 0 and not stopping:
                    failed = True
                    stop(signal.SIGTERM, None)  # drain the others
        return 1 if failed or any(p.exitcode != 0 for p in everyone) else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
