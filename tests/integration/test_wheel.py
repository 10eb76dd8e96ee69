"""The wheel works anywhere: built from the sources, installed into a fresh virtualenv outside the
repo, and run from a folder that is not the repo, with none of the repo's environment.

Slow-ish (about a minute: a build, a venv, dependencies from pip's cache, two broker starts, two
demos). The demo brings its own broker(s) in the temp folder, so it does not use the session one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from refold.cli.broker import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]  # one build per run

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built with pip from a clean copy of the sources.

    A copy, because setuptools builds in the source tree: a stale `build/` there can carry a
    deleted module into the wheel, and the repo's tree is not ours to write into.
    """
    root = tmp_path_factory.mktemp("wheel-build")
    src, out = root / "src", root / "dist"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in _package_dirs().values():
        top = folder.split("/")[0]
        if not (src / top).exists():
            shutil.copytree(REPO / top, src / top, ignore=junk)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [built] = out.glob("refold-*.whl")
    return built


def _package_dirs() -> dict[str, str]:
    """Import package -> source folder, as pyproject.toml maps them."""
    tool = PYPROJECT["tool"]["setuptools"]
    mapping = tool["package-dir"]
    dirs = {}
    for package in tool["packages"]:
        parent = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        dirs[package] = mapping[parent] + package[len(parent) :].replace(".", "/")
    return dirs


def test_the_wheel_holds_refold_and_nothing_else(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"refold", f"refold-{VERSION}.dist-info"}
    for needed in (
        "refold/py.typed",
        "refold/deploy/kafka/pom.xml",
        "refold/schemas/sagas/SagaEvent.avsc",
    ):
        assert needed in names
    bank_schemas = {n for n in names if re.fullmatch(r"refold/schemas/bank/\w+\.avsc", n)}
    assert len(bank_schemas) == len(list((REPO / "schemas" / "bank").glob("*.avsc"))) > 0

    # Every module of the sources is in it: a new subpackage missing from pyproject.toml's
    # `packages` list would otherwise ship a wheel that fails on import.
    expected = {
        f"{package.replace('.', '/')}/{path.name}"
        for package, folder in _package_dirs().items()
        for path in (REPO / folder).glob("*.py")
    }
    source_dirs = {REPO / folder for folder in _package_dirs().values()}
    for init in (
        p for top in ("streams", "projections") for p in (REPO / top).rglob("__init__.py")
    ):
        assert init.parent in source_dirs, f"{init.parent} is not in pyproject.toml's packages"
    assert expected <= names, sorted(expected - names)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the repo with the wheel installed (dependencies from PyPI)."""
    path = tmp_path_factory.mktemp("wheel-venv") / "venv"
    assert REPO not in path.parents
    # No --system-site-packages: nothing of the interpreter running the tests may leak in.
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    done = subprocess.run(
        [str(path / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        env=_outside_env(path, path.parent),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return path


def _outside_env(venv: Path, data_dir: Path) -> dict[str, str]:
    """The environment of a user of the wheel: the venv first on PATH, nothing of the repo.

    Kept: HOME (the broker jars' cache in ~/.cache/refold and pip's cache), REFOLD_KAFKA_CACHE
    (a user-level cache, not the repo's), proxies and the like. Dropped: PYTHON*, VIRTUAL_ENV,
    every other REFOLD_*, and PATH entries inside the repo.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "REFOLD_", "VIRTUAL_ENV", "PYTEST"))
        or k == "REFOLD_KAFKA_CACHE"
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and REPO not in Path(p).parents]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["REFOLD_DATA_DIR"] = str(data_dir)
    return env


class Outside:
    """Runs the installed `refold` from a temp folder that is not the repo."""

    def __init__(self, venv: Path, cwd: Path) -> None:
        self.venv, self.cwd = venv, cwd
        self.env = _outside_env(venv, cwd / "data")

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Start a long-running command; its output goes to `<cwd>/<command>.log`."""
        with (self.cwd / f"{args[1]}.log").open("wb") as log:
            return subprocess.Popen(
                [str(self.venv / "bin" / args[0]), *args[1:]],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout


@pytest.fixture
def outside(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    cwd = tmp_path_factory.mktemp("outside")
    assert REPO not in cwd.parents and not (cwd / "schemas").exists()
    runner = Outside(venv, cwd)
    try:
        yield runner
    finally:
        runner.run("refold", "broker", "stop")  # whatever a failed step left running


def test_the_installed_wheel_imports_from_its_venv(outside: Outside) -> None:
    code = "import refold, refold.examples.bank; print(refold.__file__)"
    where = outside.ok("python", "-c", code)
    assert Path(where.strip()).is_relative_to(outside.venv), where
    assert "usage: refold" in outside.ok("refold", "--help")
    assert "--http HOST:PORT" in outside.ok("refold", "worker", "--help")


def test_without_an_app_the_cli_says_what_to_name(outside: Outside) -> None:
    """Outside a project folder nothing is loaded: no schemas/, no app. The errors say so."""
    done = outside.run("refold", "worker")
    assert done.returncode == 1 and "nothing to run: no app named" in done.stderr
    assert "REFOLD_APP" in done.stderr and len(done.stderr.splitlines()) == 1
    args = ["--type", "bank.MoneyDeposited", "--key", "acc-1", "--data", "{}"]
    done = outside.run("refold", "publish", "bank.accounts", *args)
    assert done.returncode == 2 and "no schemas are loaded" in done.stderr, done.stderr


def test_the_demo_runs_from_the_wheel(outside: Outside) -> None:
    # Alone, as a new user runs it: it starts a broker and stops it again.
    out = outside.ok("refold", "demo")
    _assert_demo_story(out)
    assert "starting a local Kafka broker" in out
    assert "stopped the broker the demo started" in out
    assert outside.run("refold", "broker", "status").returncode == 1

    # Beside a broker the user started: the demo uses it and leaves it running.
    port = free_port()
    assert f"at 127.0.0.1:{port}" in outside.ok("refold", "broker", "start", "--port", str(port))
    out = outside.ok("refold", "demo")
    _assert_demo_story(out)
    assert "starting a local Kafka broker" not in out
    assert outside.run("refold", "broker", "status").returncode == 0

    # The bank app's worker, with a reader process (`python -m refold.http.replica`) beside it.
    account = re.findall(r"OpenAccount +(alice-\w+) +accepted", out)[0]
    http = free_port()
    app = ["--app", "refold.examples.bank", "--http", f"127.0.0.1:{http}", "--http-procs", "2"]
    worker = outside.popen("refold", "worker", *app)
    try:
        url = f"http://127.0.0.1:{http}/projections/balances/{account}"
        for _ in range(4):  # new connections: the kernel spreads them over both processes
            # the story's 1,391.75 less the demo's completed transfer (the other was refunded)
            assert _get_when_up(url, worker)["state"]["balance_cents"] == 109175
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0, (outside.cwd / "worker.log").read_text()
    assert "stopped 1 node(s)" in outside.ok("refold", "broker", "stop")
    assert outside.run("refold", "broker", "status").returncode == 1


def _assert_demo_story(out: str) -> None:
    """The passbook story's key lines: accepted and refused commands, balances, HTTP."""
    run = re.search(r"OpenAccount +alice-(\w+) +accepted", out)
    assert run, out
    acc = f"alice-{run[1]}"
    assert re.search(rf"Withdraw +alice-{run[1]} +1,200\.00 +accepted", out), out
    assert re.search(rf"Withdraw +bob-{run[1]} +5,000\.00 +rejected: insufficient funds", out), out
    for account, owner, balance in [
        (acc, "alice", "1,391.75"),
        (f"alice-savings-{run[1]}", "alice", "400.00"),
        (f"bob-{run[1]}", "bob", "176.01"),
    ]:
        assert re.search(rf"^  {account} +{owner} +{re.escape(balance)} ", out, re.M), out
    assert re.search(r"refund +150\.00 +1,391\.75$", out, re.M), out  # the passbook's last line
    assert re.search(rf"GET http://127\.0\.0\.1:\d+/projections/balances/{acc}\n", out), out
    assert '"balance_cents": 139175' in out
    # The statements task queue: three 202s, a status right away, each task succeeded.
    assert len(re.findall(r"POST /tasks/statements \{.*\}  202 accepted$", out, re.M)) == 3, out
    assert re.search(r"at once: 200 (accepted|dispatched|running|succeeded)$", out, re.M), out
    assert len(re.findall(rf"^  statement-\S+-{run[1]}-\d{{4}}-\d\d +succeeded ", out, re.M)) == 3
    assert re.search(rf"statement of {acc} for .*closing 1,391\.75$", out, re.M), out
    assert re.search(rf"rent-share-{run[1]} +{acc} -> bob-{run[1]}: completed", out), out
    assert re.search(rf"typo-{run[1]} +{acc} -> bobb-{run[1]}: compensated", out), out


def _get_when_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> Any:
    """GET `url` as JSON once the server answers (it may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
