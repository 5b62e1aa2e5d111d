"""Starting a real server process on 127.0.0.1 for the serving tests, and stopping it with its workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
START_TIMEOUT = 420  # seconds: two spawned workers import torch on busy CI cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`command` run in its own process group (its LitServe workers with it); `health` records every /health
    status seen while starting."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        environ = {**os.environ, **(env or {})}
        environ["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), environ.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=environ,
                                        start_new_session=True)
        self.health: list[int] = []

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                status = requests.get(self.url + "/health", timeout=5).status_code
            except requests.RequestException:
                status = None
            if status is not None and (not self.health or self.health[-1] != status):
                self.health.append(status)
            if status == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready within {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # LitServe shuts its workers down on SIGINT
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


def serve_command(models: dict[str, Path], port: int, *overrides: str) -> list[str]:
    """The affordvla-serve command line (as a user types it, through python -m)."""
    return [sys.executable, "-m", "affordvla.serve.cli", *[f"models.{k}={v}" for k, v in models.items()],
            f"port={port}", "accelerator=cpu", *overrides]
