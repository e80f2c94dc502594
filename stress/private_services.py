"""Private Redis and PostgreSQL servers for fault tests: stop, kill, freeze and restart them.

The machine's shared Redis and PostgreSQL must never be stopped or reconfigured; a test that
needs a dependency to fail starts one of these instead, on a free port in a directory of its
own, and does what it likes with it. Each helper only ever signals the processes it started
(by pid), and its context manager always kills them and deletes the directory, whatever
happened in the test::

    with PrivateRedis(appendonly=True) as redis_server:
        settings = ...(redis_url=redis_server.url)
        redis_server.kill()
        redis_server.start()  # same port and directory: the data of the append-only file

    with PrivatePostgres() as pg:
        dsn = pg.dsn_for("waitroom_x")
        pg.stop("immediate")
        pg.start()

PostgreSQL refuses to run as root: as root, its binaries run as the ``postgres`` user
(``runuser``, or ``su``), in a directory under the system temporary directory owned by it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import redis as redis_sync

from stress.common import free_port

#: Files and folders a Redis server keeps its data in (RDB snapshot, append-only files).
_REDIS_DATA = ("dump.rdb", "appendonlydir", "appendonly.aof")


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the one process ``pid`` (never a group); gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class PrivateRedis:
    """A ``redis-server`` of the test's own on 127.0.0.1 and a free port.

    ``appendonly`` turns on the append-only file (``appendfsync everysec``), so a restart
    (:meth:`start` after :meth:`kill` or :meth:`stop`) gets the data back; without it the
    server saves nothing by itself (``--save ''``), and starts from whatever data files its
    directory holds (an explicit ``SAVE`` writes ``dump.rdb``), which is nothing unless the
    test saved. ``replicaof`` makes it a replica of ``(host, port)``. ``extra`` are more
    ``--name value`` arguments, given at every start.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        replicaof: tuple[str, int] | None = None,
        extra: Sequence[str] = (),
        start: bool = True,
    ) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="waitroom-redis-"))
        self.appendonly = appendonly
        self.replicaof = replicaof
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self, *extra: str) -> list[str]:
        """The command line of a start with ``extra`` arguments for this start only."""
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.log_path),
            # DEBUG POPULATE, DEBUG RELOAD... from 127.0.0.1: tests build states with them.
            "--enable-debug-command",
            "local",
            # A replica's first sync starts at once, not after the default 5 s wait for more.
            "--repl-diskless-sync-delay",
            "0",
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        if self.replicaof is not None:
            args += ["--replicaof", self.replicaof[0], str(self.replicaof[1])]
        return [*args, *self.extra, *extra]

    def start(self, *extra: str, timeout: float = 15.0) -> PrivateRedis:
        """Start the server (same port and directory each time) and wait until it answers.

        A server still loading its data answers ``LOADING``: that counts as answering
        (a test of loading wants exactly that state). ``extra`` arguments apply to this start.
        """
        if self.running:
            raise RuntimeError(f"private Redis on port {self.port} is already running")
        self.proc = subprocess.Popen(
            self.args(*extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.dir,
        )
        self.paused = False
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: {stderr}{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {timeout:g} s{self.log()}")
            time.sleep(0.02)
        return self

    def ping_reply(self, timeout: float = 1.0) -> bytes:
        """The first line of the server's reply to PING on a new connection (``b"+PONG"``,
        ``b"-LOADING Redis is loading the dataset in memory"``...), or ``b""`` when it
        cannot be reached or says nothing within ``timeout``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(512)
        except OSError:
            return b""
        return reply.split(b"\r\n", 1)[0]

    def answers(self) -> bool:
        """True when the server replies to PING with anything (PONG, LOADING, MASTERDOWN...)."""
        return self.ping_reply()[:1] in (b"+", b"-")

    def loading(self) -> bool:
        """True while the server is loading its data set (it answers ``LOADING``)."""
        return self.ping_reply().startswith(b"-LOADING")

    def client(self, socket_timeout: float = 10.0) -> redis_sync.Redis:
        """A synchronous redis-py client of this server (the caller closes it)."""
        return redis_sync.Redis(host="127.0.0.1", port=self.port, socket_timeout=socket_timeout)

    def log(self) -> str:
        """The tail of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- redis.log ---\n" + text[-2000:]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown: the append-only file is flushed), then wait."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash; whatever was not yet on disk is lost."""
        self._end(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket open and answers nothing (a hung server)."""
        if self.proc is not None and self.running:
            _signal(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.proc is not None and self.paused:
            _signal(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def restart_empty(self, *extra: str) -> PrivateRedis:
        """Kill the server, delete its data files and start it again: Redis lost everything."""
        self.kill()
        self.delete_data()
        return self.start(*extra)

    def delete_data(self) -> None:
        """Delete the data files of the (stopped) server."""
        for name in os.listdir(self.dir):
            path = self.dir / name
            if name in _REDIS_DATA or name.startswith(("appendonly", "temp-")):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.paused:
            _signal(proc.pid, signal.SIGCONT)
            self.paused = False
        _signal(proc.pid, sig)
        if not _wait_exit(proc, timeout):
            _signal(proc.pid, signal.SIGKILL)
            _wait_exit(proc, 10.0)
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        """Kill the server (if it runs) and delete its directory."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pg_bindir() -> Path:
    """The directory of PostgreSQL's server binaries (initdb, pg_ctl, postgres)."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        )
        candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in candidates:
        if all((directory / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")


def _as_root() -> bool:
    return os.geteuid() == 0


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not: in a container whose init
    does not reap, a stopped postmaster stays one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s direct children (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own on 127.0.0.1 and a free port (trust auth).

    :meth:`stop` takes PostgreSQL's shutdown modes: ``fast`` (sessions are ended with
    ``FATAL: terminating connection due to administrator command``) or ``immediate`` (every
    process quits at once, as in a crash). :meth:`pause` freezes the postmaster and its
    backends (SIGSTOP): connections stay open and nothing answers.
    """

    def __init__(self, *, settings: Sequence[str] = (), start: bool = True) -> None:
        self.bindir = pg_bindir()
        self.port = free_port()
        self.settings = list(settings)
        self.paused: list[int] = []
        # Under the system temporary directory, not pytest's: as root, the postgres user
        # must reach it (pytest's base directory is private to root).
        self.dir = Path(tempfile.mkdtemp(prefix="waitroom-pg-"))
        self.data = self.dir / "data"
        try:
            if _as_root():
                shutil.chown(self.dir, "postgres", "postgres")
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    @property
    def dsn(self) -> str:
        """The ``postgres`` database of the cluster."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """A DSN of ``database`` in this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    def _command(self, *args: str) -> list[str]:
        if not _as_root():
            return list(args)
        if shutil.which("runuser"):
            return ["runuser", "-u", "postgres", "--", *args]
        return ["su", "-s", "/bin/sh", "postgres", "-c", " ".join(map(_quote, args))]

    def _run(self, binary: str, *args: str, timeout: float = 60.0) -> None:
        command = self._command(str(self.bindir / binary), *args)
        # cwd /: our working directory may be unreadable to the postgres user.
        done = subprocess.run(
            command,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{binary} {' '.join(args)} failed ({done.returncode}):"
                f" {done.stdout}{done.stderr}{self.log()}"
            )

    def start(self, timeout: float = 30.0) -> PrivatePostgres:
        """Start the cluster (same port and data each time) and wait until it accepts."""
        options = [
            f"-p {self.port}",
            f"-k {self.dir}",
            "-c listen_addresses=127.0.0.1",
            "-c fsync=off",
            *(f"-c {setting}" for setting in self.settings),
        ]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(timeout)),
            "-o",
            " ".join(options),
            "start",
            timeout=timeout + 10,
        )
        return self

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """``pg_ctl stop -m MODE`` (``smart``, ``fast`` or ``immediate``), waiting for it."""
        self.resume()
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            "stop",
            timeout=timeout + 10,
        )

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend: connections stay open, nothing answers."""
        pid = self.pid
        if pid is None:
            return
        for process in [pid, *_children(pid)]:
            _signal(process, signal.SIGSTOP)
            self.paused.append(process)

    def resume(self) -> None:
        """SIGCONT whatever :meth:`pause` froze."""
        while self.paused:
            _signal(self.paused.pop(), signal.SIGCONT)

    def log(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- postgres.log ---\n" + text[-2000:]

    def close(self) -> None:
        """Stop the cluster at once (SIGKILL if that fails) and delete its directory."""
        try:
            self.resume()
            if self.pid is not None:
                try:
                    self.stop("immediate", timeout=15)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pid = self.pid
                    if pid is not None:
                        for process in [*_children(pid), pid]:
                            _signal(process, signal.SIGKILL)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def private_cluster(run_dir: Path, timeout: float = 180.0) -> Iterator[str]:
    """A private 6-node Redis Cluster (3 primaries, 3 replicas) under ``run_dir``, started
    by ``scripts/services --cluster`` and stopped by it afterwards; yields its URL
    (``redis+cluster://...``)."""
    env = {**os.environ, "SERVICES_RUN_DIR": str(run_dir)}
    env.pop("WAITROOM_REDIS_URL", None)  # the cluster's own URL, not the configured one
    started = subprocess.run(
        [str(ROOT / "scripts/services"), "--cluster"],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    try:
        if started.returncode != 0:
            raise RuntimeError(
                f"scripts/services --cluster failed: {started.stderr}{started.stdout}"
            )
        yield next(
            line.split("=", 1)[1]
            for line in (run_dir / "env").read_text().splitlines()
            if line.startswith("export WAITROOM_REDIS_URL=")
        )
    finally:
        subprocess.run(
            [str(ROOT / "scripts/services"), "stop", "--cluster"],
            env=env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
