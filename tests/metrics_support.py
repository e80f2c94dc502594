"""Helpers of the metrics, dashboard and alert tests.

- :func:`debian_binary`: Debian's Prometheus tools (``prometheus``, ``promtool``, ``amtool``,
  ``prometheus-redis-exporter``), installed with apt-get when missing and we are root, as
  the HAProxy and Chromium tests get theirs; never downloaded any other way. (On a machine
  with systemd, installing the packages also enables their system services, as Debian does;
  the tests use processes of their own on private ports either way.)
- :func:`process`: a real process of ours (``waitroom serve``, ``waitroom workers``,
  Prometheus...) for the duration of a block, logging to a file, stopped by its pid.
- :class:`Prometheus`: a real Prometheus on a private port and data directory, and its API.
- :func:`samples`: the samples of a Prometheus text page.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import ROOT, free_port

#: The Debian package of each binary.
PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-redis-exporter": "prometheus-redis-exporter",
}
DEPLOY = ROOT / "deploy"


def debian_binary(name: str) -> str:
    """The path of ``name``, installing its Debian package first when it is missing."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None
    )
    if found:
        return found
    package = PACKAGES[name]
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Another test run may be installing at the same moment: wait for dpkg's lock.
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-qq"]
        subprocess.run([*apt, "update"], check=False, capture_output=True, env=env)
        installed = subprocess.run(
            [*apt, "install", "-y", "--no-install-recommends", package],
            check=False,
            capture_output=True,
            text=True,
            env=env,
        )
        if installed.returncode == 0 and os.access(f"/usr/bin/{name}", os.X_OK):
            return f"/usr/bin/{name}"
        pytest.fail(f"apt-get could not install {package}: {installed.stderr[-500:]}")
    pytest.fail(
        f"this test needs {name}: install it with 'sudo apt-get install -y {package}'",
        pytrace=False,
    )


@contextmanager
def process(
    argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` running for the block (output to ``log``); SIGTERM at the end, then SIGKILL
    if it has not stopped within 20 s."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    *,
    timeout: float = 60,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Wait until ``url`` answers 200; fail with the process's log if it exits first."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{url}: the process exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if http.get(url, headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def waitroom_argv(*args: str) -> list[str]:
    """The ``waitroom`` console script of this virtualenv with ``args``."""
    return [str(Path(sys.executable).with_name("waitroom")), *args]


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` in a Prometheus text page: (labels, value)."""
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group("name") != name:
            continue
        labels = {m.group("key"): m.group("value") for m in _LABEL.finditer(match["labels"] or "")}
        found.append((labels, float(match.group("value"))))
    return found


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` with exactly ``labels``, None if absent."""
    for found, value in samples(text, name):
        if found == labels:
            return value
    return None


class Prometheus:
    """A real Prometheus (Debian's binary) on 127.0.0.1, a free port and ``data_dir``."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.workdir = workdir
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"

    @contextmanager
    def running(self) -> Iterator[Prometheus]:
        """Prometheus for the block, ready to answer queries."""
        argv = [
            debian_binary("prometheus"),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with process(argv, self.log) as proc:
            wait_http(f"{self.url}/-/ready", proc, self.log, timeout=30)
            yield self

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``: its ``data`` (fails the test on an error answer)."""
        with httpx.Client(timeout=15) as http:
            response = http.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> Any:
        """A range query's result (a list of series, each with its ``values``)."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus holds."""
        return set(self.api("label/__name__/values"))


def finite(series: list[dict[str, Any]]) -> bool:
    """Whether any point of a range query's series is a finite number."""
    return any(math.isfinite(float(value)) for one in series for _, value in one.get("values", []))
