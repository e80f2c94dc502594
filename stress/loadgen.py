"""A closed-loop HTTP/1.1 load generator cheap enough not to be the bottleneck on 2 cores.

``python -m stress.loadgen`` is a child process of a benchmark (several run side by side, so
the load is not bound to one core). Each one opens ``--connections`` keep-alive connections
to 127.0.0.1 and keeps exactly one request in flight on each: the next request goes out as
soon as the previous answer is complete. Requests are pre-built bytes (only the
``X-Forwarded-For`` address changes, so every request can come from its own simulated
client); answers are framed by ``Content-Length`` and not otherwise parsed. All of it runs in
:class:`asyncio.Protocol` callbacks, without a coroutine per request: httpx costs about ten
times more CPU per request, which on this machine would be CPU taken from the server.

The dialogue with the parent, one line each over stdin/stdout:

1. the child connects every connection, then prints ``ready``;
2. the parent writes ``go`` to every child at once;
3. the child runs ``--warmup`` seconds unmeasured, then ``--seconds`` measured, stops
   sending, waits for the answers still in flight, writes the latencies of the requests
   sent in the measured window to ``--out`` (``array('d')``, seconds) and prints one JSON
   line (:class:`Summary`).

The parent side is :func:`run_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import msgspec
import uvloop

from stress.server import CpuMeter

#: Give up on answers still in flight this long after the window closed.
_DRAIN_S = 10.0


class Summary(msgspec.Struct):
    """What one generator process measured."""

    #: Answers completed inside the measured window (their count / window = throughput).
    completed: int
    window_s: float
    #: Every answer, warm-up included, by status code (as text: JSON object keys).
    statuses: dict[str, int]
    connections_lost: int
    #: CPU seconds this process used during warm-up and window.
    cpu_s: float


def _ip(n: int) -> bytes:
    # 10.0.0.0/8 holds 2**24 addresses: a fresh one per request in any run we make.
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}".encode()


class _Load:
    """The shared state of one generator process's connections."""

    def __init__(self, head: bytes, tail: bytes, ip_offset: int) -> None:
        self.head = head
        self.tail = tail
        self.next_ip = ip_offset
        self.running = False
        self.window_start = float("inf")
        self.window_end = float("inf")
        self.completed = 0
        self.latencies = array("d")
        self.statuses: dict[int, int] = {}
        self.in_flight = 0
        self.lost = 0
        self.drained = asyncio.Event()

    def request(self) -> bytes:
        ip = _ip(self.next_ip)
        self.next_ip += 1
        return self.head + ip + self.tail

    def answered(self, client: _Client, status: int) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if self.window_start <= client.sent_at < self.window_end:
            self.latencies.append(now - client.sent_at)
        if self.window_start <= now <= self.window_end:
            self.completed += 1
        if self.running and now < self.window_end:
            client.fire()
        elif self.in_flight == 0:
            self.drained.set()


class _Client(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        #: Bytes of the answer being read (head + body), once its head is complete.
        self.need = 0
        self.status = 0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small requests must leave at once, not wait for the previous answer's ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def fire(self) -> None:
        assert self.transport is not None
        self.load.in_flight += 1
        self.sent_at = time.perf_counter()
        self.transport.write(self.load.request())

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while True:
            if not self.need:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[: end + 2].lower()  # each header line ends with CRLF
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                length = int(head[at + 17 : head.find(b"\r\n", at + 2)]) if at >= 0 else 0
                self.need = end + 4 + length
            if len(buffer) < self.need:
                break
            buffer = buffer[self.need :]
            self.need = 0
            self.load.answered(self, self.status)
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if self.load.running:
            self.load.lost += 1


async def _generate(args: argparse.Namespace) -> tuple[array[float], Summary]:
    loop = asyncio.get_running_loop()
    head = (
        f"{args.method} {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\nX-Forwarded-For: "
    ).encode()
    tail = b"\r\nContent-Length: 0\r\n\r\n"
    load = _Load(head, tail, args.ip_offset)
    clients: list[_Client] = []
    for _ in range(args.connections):
        _, client = await loop.create_connection(lambda: _Client(load), "127.0.0.1", args.port)
        clients.append(client)
    print("ready", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("loadgen: expected 'go'")
    cpu0 = _cpu()
    now = time.perf_counter()
    load.window_start = now + args.warmup
    load.window_end = load.window_start + args.seconds
    load.running = True
    for client in clients:
        client.fire()
    await asyncio.sleep(load.window_end - time.perf_counter())
    load.running = False
    if load.in_flight:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.drained.wait(), _DRAIN_S)
    cpu = _cpu() - cpu0
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    return load.latencies, Summary(
        completed=load.completed,
        window_s=args.seconds,
        statuses={str(k): v for k, v in sorted(load.statuses.items())},
        connections_lost=load.lost,
        cpu_s=round(cpu, 3),
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Entry point of one generator process (see the module's docstring)."""
    parser = argparse.ArgumentParser(prog="python -m stress.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--ip-offset", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    latencies, summary = uvloop.run(_generate(args))
    Path(args.out).write_bytes(latencies.tobytes())
    print(msgspec.json.encode(summary).decode(), flush=True)
    return 0


# --- the parent's side ---------------------------------------------------------------------


@dataclass
class LoadResult:
    """The merged measurements of every generator process of one phase."""

    rps: float
    latencies: list[float]
    statuses: dict[int, int]
    connections_lost: int
    #: CPU over the window, in percent of one core, by process group (see CpuMeter).
    cpu_pct: dict[str, float]
    window_s: float


async def run_load(
    *,
    port: int,
    method: str,
    path: str,
    connections: int,
    generators: int,
    seconds: float,
    warmup: float,
    ip_offset: int,
    work_dir: Path,
    watch: dict[str, list[int]] | None = None,
) -> LoadResult:
    """Run ``generators`` child processes sharing ``connections``; merge what they measured.

    Each child draws its X-Forwarded-For addresses from its own block of 2**18, starting at
    ``ip_offset``, so no two requests of a phase share a client address (nor of a run, with
    phases 2**20 apart; the 2**24 addresses of 10.0.0.0/8 wrap around after 16 phases, by
    then long refilled buckets). ``watch`` names
    groups of processes (the server...) whose CPU use over the window is reported.
    """
    shares = [connections // generators + (i < connections % generators) for i in range(generators)]
    procs: list[asyncio.subprocess.Process] = []
    outs: list[Path] = []
    try:
        for i, share in enumerate(shares):
            out = work_dir / f"latencies-{ip_offset}-{i}.bin"
            outs.append(out)
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "stress.loadgen",
                    f"--port={port}",
                    f"--method={method}",
                    f"--path={path}",
                    f"--connections={share}",
                    f"--seconds={seconds}",
                    f"--warmup={warmup}",
                    f"--ip-offset={ip_offset + i * (1 << 18)}",
                    f"--out={out}",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        await wait_ready(procs, "a load generator", 30)
        await go(procs)
        # Where the CPU went during the measured window (roughly: the children time it
        # from their own 'go').
        await asyncio.sleep(warmup)
        meter = CpuMeter({**(watch or {}), "generators": [p.pid for p in procs]})
        await asyncio.sleep(seconds)
        cpu = meter.read()
        summaries: list[Summary] = []
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), warmup + seconds + 60)
            summaries.append(msgspec.json.decode(line, type=Summary))
            await proc.wait()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    latencies: list[float] = []
    for out in outs:
        values = array("d")
        values.frombytes(out.read_bytes())
        latencies.extend(values)
        out.unlink()
    statuses: dict[int, int] = {}
    for summary in summaries:
        for code, count in summary.statuses.items():
            statuses[int(code)] = statuses.get(int(code), 0) + count
    return LoadResult(
        rps=sum(s.completed for s in summaries) / seconds,
        latencies=latencies,
        statuses=statuses,
        connections_lost=sum(s.connections_lost for s in summaries),
        cpu_pct=cpu,
        window_s=seconds,
    )


if __name__ == "__main__":
    sys.exit(main())


async def wait_ready(procs: list[asyncio.subprocess.Process], what: str, timeout: float) -> None:
    """Wait until every generator child has printed ``ready`` (connected, waiting to go)."""
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if line.strip() != b"ready":
            raise RuntimeError(f"{what} did not start: {line!r}")


async def go(procs: list[asyncio.subprocess.Process]) -> None:
    """Tell every ready child to start: all within a few hundred microseconds."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
    for proc in procs:
        assert proc.stdin is not None
        await proc.stdin.drain()
