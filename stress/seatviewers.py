"""One client process of ``python -m stress seats --viewers N``: viewers of a live seat map.

``python -m stress.seatviewers`` is a child of :mod:`stress.seatfanout`; several may run side
by side (one process holds at most some thousands of sockets under the limit of 20,000 open
files, and the load spreads over both cores). It speaks to its parent line by line:

1. raises its open-files limit; opens ``--viewers`` WebSockets on
   ``/v1/events/{id}/seats/live`` (each viewer from its own ``X-Forwarded-For`` address, as
   behind a trusted proxy: the server caps sockets per address), ``--connect-concurrency``
   handshakes at a time, and waits for every viewer's ``ready``; then reads the snapshot
   (``GET /v1/events/{id}/seats?v=V``, V the highest ``ready`` version, as the page does):
   the map every viewer starts from. Prints ``connected N`` (N viewers ready);
2. on ``go``, answers ``recording N`` and from then on keeps, for every viewer, each
   ``seats`` message received and when, reading in batches (``--nap-ms``,
   :func:`stress.wsclient.nap`: the server, not this process, would otherwise pay for a
   wake-up per message over loopback; receipt times are late by as much at most);
3. on ``final V PATH`` (the last publication's version; a JSON file of every publication's
   version and unix time), waits until every open viewer has received a message of version
   V or more (or ``--timeout`` runs out) and prints ``delivered N`` (the viewers that did);
4. then measures, without hurrying the server: each viewer's map, rebuilt from the snapshot
   and the messages it received in order, against ``--expected`` (the final ledger, seat id ->
   letter): ``diverged`` counts the viewers whose map differs; every publication's *lag* to
   every viewer, from its publication to the arrival of the first message whose version
   covers it (seconds, ``array('d')`` to ``--out``); prints one JSON line
   (:class:`ViewerReport`), closes every socket and exits.

Viewers that received the same messages in the same order rebuild the same map, so the map
is rebuilt once per distinct sequence of messages (one, when nothing was lost), and each
distinct message is decoded once: this process stays cheap while the server is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import resource
import sys
import time
from array import array
from pathlib import Path

import httpx
import msgspec
import uvloop

from stress.wsclient import Fan, close_all, connect, nap, raise_file_limit

_READY = b'{"type":"ready"'
_SEATS = b'{"type":"seats"'


class _Versioned(msgspec.Struct):
    version: int


class _Seats(msgspec.Struct):
    version: int
    changes: dict[str, str]


class _Snapshot(msgspec.Struct):
    seats: list[str]
    version: int
    states: str


class Publications(msgspec.Struct):
    """The parent's record of the replay: each publication's version and unix time."""

    versions: list[int]
    times: list[float]


class ViewerReport(msgspec.Struct):
    """What one client process saw."""

    viewers: int
    connected: int
    connect_failed: int
    connect_s: float
    #: Viewers still connected when the last publication had reached them all (or at the end).
    open_at_end: int
    #: Viewers whose connection closed before the end.
    dropped: int
    close_codes: dict[str, int]
    #: ``seats`` messages received after ``go``, their payload bytes, and how many distinct.
    messages: int
    payload_bytes: int
    distinct_messages: int
    #: Viewers whose last message's version is below the last publication's.
    behind: int
    #: Publications not covered by any message a viewer received, summed over viewers.
    publications_missed: int
    #: Viewers whose rebuilt map differs from the final ledger.
    diverged: int
    #: Seconds from ``final`` until every viewer had the last publication.
    final_wait_s: float
    snapshot_version: int
    cpu_s: float


class _Viewer:
    __slots__ = ("messages", "ready", "times", "version")

    def __init__(self) -> None:
        self.ready: int | None = None
        self.version = 0
        self.messages = array("l")
        self.times = array("d")


class _Viewers:
    """Every viewer of this process and what each received."""

    def __init__(self) -> None:
        self.by_fan: dict[Fan, _Viewer] = {}
        #: Distinct ``seats`` payloads: their number (the index) and version.
        self.payload_ids: dict[bytes, int] = {}
        self.payloads: list[bytes] = []
        self.versions: list[int] = []
        self.recording = False
        self.target: int | None = None
        self.reached = 0
        self.all_reached = asyncio.Event()
        self.all_ready = asyncio.Event()
        self.expected_ready = 0
        self.ready = 0
        self.open = 0
        self.all_closed = asyncio.Event()
        self.dropped = 0
        self.close_codes: dict[str, int] = {}
        self.ending = False

    def on_open(self, fan: Fan) -> None:
        self.by_fan.setdefault(fan, _Viewer())
        self.open += 1

    def on_message(self, fan: Fan, data: bytes, now: float) -> None:
        viewer = self.by_fan.setdefault(fan, _Viewer())
        if data.startswith(_READY):
            viewer.ready = msgspec.json.decode(data, type=_Versioned).version
            self.ready += 1
            if self.ready >= self.expected_ready:
                self.all_ready.set()
            return
        if not self.recording or not data.startswith(_SEATS):
            return
        pid = self.payload_ids.get(data)
        if pid is None:
            pid = self.payload_ids[data] = len(self.payloads)
            self.payloads.append(data)
            self.versions.append(msgspec.json.decode(data, type=_Versioned).version)
        viewer.messages.append(pid)
        viewer.times.append(now)
        before = viewer.version
        viewer.version = max(before, self.versions[pid])
        target = self.target
        if target is not None and before < target <= viewer.version:
            self._reached()

    def _reached(self) -> None:
        self.reached += 1
        if self.reached >= self.open:
            self.all_reached.set()

    def aim(self, target: int) -> None:
        """Wait for ``target``: count the viewers already there."""
        self.target = target
        self.reached = sum(
            1 for fan, v in self.by_fan.items() if v.version >= target and not fan.closed
        )
        if self.reached >= self.open:
            self.all_reached.set()

    def on_closed(self, fan: Fan) -> None:
        self.open -= 1
        if self.open <= 0:
            self.all_closed.set()
        if not self.ending:
            self.dropped += 1
            code = str(fan.ws.close_code) if fan.ws.close_code is not None else "none"
            self.close_codes[code] = self.close_codes.get(code, 0) + 1
            viewer = self.by_fan.get(fan)
            if self.target is not None and viewer is not None and viewer.version >= self.target:
                self.reached -= 1  # counted among the open ones no longer
            if self.target is not None and self.reached >= self.open:
                self.all_reached.set()


def rebuild(
    start: bytes, index: dict[str, int], payloads: list[bytes], sequence: array[int]
) -> bytearray:
    """The map ``start`` (one letter a seat) after the ``payloads`` of ``sequence`` in order."""
    states = bytearray(start)
    decoded: dict[int, list[tuple[int, int]]] = {}
    for pid in sequence:
        changes = decoded.get(pid)
        if changes is None:
            message = msgspec.json.decode(payloads[pid], type=_Seats)
            changes = decoded[pid] = [
                (index[seat], ord(letter)) for seat, letter in message.changes.items()
            ]
        for i, letter in changes:
            states[i] = letter
    return states


def lags(viewer: _Viewer, versions: list[int], published: Publications, out: array[float]) -> int:
    """Append to ``out`` every publication's lag to ``viewer``; the publications it missed."""
    start = viewer.ready or 0
    at = bisect.bisect_right(published.versions, start)
    for pid, received in zip(viewer.messages, viewer.times, strict=True):
        covered = versions[pid]
        while at < len(published.versions) and published.versions[at] <= covered:
            out.append(received - published.times[at])
            at += 1
    return len(published.versions) - at


def check(
    viewers: _Viewers, snapshot: _Snapshot, publications: Path, expected: Path
) -> tuple[int, int, array[float]]:
    """The viewers whose map differs from ``expected``'s, the publications they missed in
    all, and every publication's lag to every viewer (seconds)."""
    published = msgspec.json.decode(publications.read_bytes(), type=Publications)
    index = {seat: i for i, seat in enumerate(snapshot.seats)}
    final = msgspec.json.decode(expected.read_bytes(), type=dict[str, str])
    want = bytes(ord(final[seat]) for seat in snapshot.seats)
    start = snapshot.states.encode()
    groups: dict[bytes, list[_Viewer]] = {}
    for viewer in viewers.by_fan.values():
        groups.setdefault(viewer.messages.tobytes(), []).append(viewer)
    diverged = 0
    for group in groups.values():
        if rebuild(start, index, viewers.payloads, group[0].messages) != want:
            diverged += len(group)
    out = array("d")
    missed = sum(lags(v, viewers.versions, published, out) for v in viewers.by_fan.values())
    return diverged, missed, out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _read_line(loop: asyncio.AbstractEventLoop) -> str:
    return await loop.run_in_executor(None, sys.stdin.readline)


async def _snapshot(port: int, event_id: str, version: int) -> _Snapshot:
    url = f"http://127.0.0.1:{port}/v1/events/{event_id}/seats?v={version}"
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(20):
            response = await http.get(url)
            response.raise_for_status()
            snapshot = msgspec.json.decode(response.content, type=_Snapshot)
            if snapshot.version >= version:
                return snapshot
            await asyncio.sleep(0.1)
    raise RuntimeError(f"no snapshot at version {version} or later")


async def _main(args: argparse.Namespace) -> tuple[ViewerReport, array[float]]:
    loop = asyncio.get_running_loop()
    viewers = _Viewers()
    viewers.expected_ready = args.viewers
    started = time.monotonic()
    headers = [
        {"X-Forwarded-For": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"}
        for n in range(args.ip_offset, args.ip_offset + args.viewers)
    ]
    fans, failed = await connect(
        viewers,
        args.port,
        f"/v1/events/{args.event}/seats/live",
        headers,
        args.connect_concurrency,
        max_size=None,  # a coalesced diff of a busy sale is 100 KB and more
    )
    viewers.expected_ready = len(fans)
    if viewers.ready >= len(fans):
        viewers.all_ready.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(viewers.all_ready.wait(), 30)
    connect_s = time.monotonic() - started
    ready = [v.ready for v in viewers.by_fan.values() if v.ready is not None]
    snapshot = await _snapshot(args.port, args.event, max(ready, default=0))
    print(f"connected {len(ready)}", flush=True)

    line = await _read_line(loop)
    if line.strip() != "go":
        raise SystemExit(f"seatviewers: expected 'go', got {line!r}")
    viewers.recording = True
    print(f"recording {len(ready)}", flush=True)
    cpu0 = _cpu()
    deadline = time.time() + args.timeout
    final: list[str] = []

    async def listen() -> None:
        final.extend((await _read_line(loop)).split())
        if len(final) != 3 or final[0] != "final":
            viewers.all_reached.set()  # stop napping; the parent is gone or confused
            return
        viewers.aim(int(final[1]))

    listener = asyncio.create_task(listen())
    napping = (
        asyncio.create_task(nap(deadline, args.nap_ms / 1000, viewers.all_reached))
        if args.nap_ms
        else None
    )
    await listener
    waited = time.monotonic()
    if len(final) != 3:
        raise SystemExit(f"seatviewers: expected 'final V PATH', got {final!r}")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(viewers.all_reached.wait(), max(0.0, deadline - time.time()))
    viewers.all_reached.set()
    if napping is not None:
        await napping
    final_wait_s = time.monotonic() - waited
    viewers.ending = True
    open_fans = [f for f in fans if not f.closed]
    target = int(final[1])
    print(
        f"delivered {sum(1 for f in open_fans if viewers.by_fan[f].version >= target)}", flush=True
    )
    cpu = _cpu() - cpu0

    diverged, missed, out = check(viewers, snapshot, Path(final[2]), Path(args.expected))
    messages = sum(len(v.messages) for v in viewers.by_fan.values())
    sizes = [len(p) for p in viewers.payloads]
    report = ViewerReport(
        viewers=args.viewers,
        connected=len(ready),
        connect_failed=failed,
        connect_s=round(connect_s, 2),
        open_at_end=len(open_fans),
        dropped=viewers.dropped,
        close_codes=viewers.close_codes,
        messages=messages,
        payload_bytes=sum(sizes[p] for v in viewers.by_fan.values() for p in v.messages),
        distinct_messages=len(viewers.payloads),
        behind=sum(1 for v in viewers.by_fan.values() if v.version < target),
        publications_missed=missed,
        diverged=diverged,
        final_wait_s=round(final_wait_s, 3),
        snapshot_version=snapshot.version,
        cpu_s=round(cpu, 2),
    )
    await close_all(open_fans, viewers.all_closed)
    return report, out


def main(argv: list[str] | None = None) -> int:
    """Entry point of one client process (see the module's docstring)."""
    parser = argparse.ArgumentParser(prog="python -m stress.seatviewers")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event", required=True)
    parser.add_argument("--viewers", type=int, required=True)
    parser.add_argument("--ip-offset", type=int, default=0)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--nap-ms", type=float, default=10.0, help="0: wait in epoll")
    parser.add_argument("--timeout", type=float, default=60.0, help="after 'go', at most")
    parser.add_argument("--expected", required=True, help="JSON: seat id -> final letter")
    parser.add_argument("--out", required=True, help="lags, array('d') of seconds")
    args = parser.parse_args(argv)
    raise_file_limit()
    report, out = uvloop.run(_main(args))
    Path(args.out).write_bytes(out.tobytes())
    print(msgspec.json.encode(report).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
