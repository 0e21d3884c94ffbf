"""Shared fixtures: a hang guard comes from pytest-timeout (pyproject); every test checks it left no child."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Compiled pipelines (runner.cache) of this test session go to a fresh folder, not ~/.cache/mprun."""
    os.environ["MPRUN_CACHE_DIR"] = str(tmp_path_factory.mktemp("mprun-cache"))
    os.environ.pop("MPRUN_NO_CACHE", None)


@pytest.fixture(autouse=True)
def no_child_left():
    """After every test: no child process of this test process is still alive."""
    yield
    leftovers = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert leftovers == [], f"child processes left behind: {leftovers}"


def processes_with_token(token: str) -> list[int]:
    """Pids of live processes whose environment holds ``MPRUN_TEST_TOKEN=token``."""
    found = []
    needle = f"MPRUN_TEST_TOKEN={token}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path("/proc", entry, "environ").read_bytes()
            state = Path("/proc", entry, "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry))
    return found


def wait_gone(token: str, deadline: float = 10.0) -> list[int]:
    """Wait (bounded) until no process carries ``token``; return those still there at the deadline."""
    end = time.monotonic() + deadline
    while True:
        left = processes_with_token(token)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.02)


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the real ``mprun`` entry point; fail the test if any process it started outlives it."""
    token = uuid.uuid4().hex
    full_env = {**os.environ, **(env or {}), "MPRUN_TEST_TOKEN": token}
    mprun = Path(sys.executable).with_name("mprun")
    result = subprocess.run([str(mprun), *args], check=False, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    left = wait_gone(token)
    assert left == [], f"processes left behind by mprun {' '.join(args)}: {left}"
    return result


@pytest.fixture
def marks(tmp_path, monkeypatch):
    """A fresh folder that stage functions find through ``MARKS`` (to do something once across processes)."""
    folder = tmp_path / "marks"
    folder.mkdir()
    monkeypatch.setenv("MARKS", str(folder))
    return folder


@pytest.fixture
def tmp_pipeline(tmp_path):
    """Write a pipeline file (and optionally a tasks module) into a fresh folder; return its path."""

    def write(yaml_text: str, tasks: str | None = None, name: str = "p.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml_text)
        if tasks is not None:
            (tmp_path / "tasks_t.py").write_text(tasks)
        return path

    return write


def pytest_collection_modifyitems(config, items):
    """Ray tests last: a process that has been a Ray driver keeps gRPC threads, and the `fork` start method
    of the local tests would then fork from it (what mprun refuses while Ray is connected)."""
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)
