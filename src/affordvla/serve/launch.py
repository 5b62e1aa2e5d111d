"""affordvla-serve as a child process: started in its own process group (its LitServe workers with it), waited
for until /health answers 200, stopped with all of it. The benchmark and the tests start servers this way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

START_TIMEOUT = 420.0  # seconds: spawned workers import torch, slow on busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(models: Mapping[str, str | Path], port: int, overrides: Sequence[str] = ()) -> list[str]:
    """The affordvla-serve command line, on 127.0.0.1 only."""
    return [sys.executable, "-m", "affordvla.serve.cli", *[f"+models.{k}={v}" for k, v in models.items()],
            f"port={port}", "host=127.0.0.1", *overrides]


class ServerProcess:
    """`command` (a server on 127.0.0.1:`port`) with its output in `log`; `health` records each /health status
    seen while it starts (None while the port does not answer)."""

    def __init__(self, command: Sequence[str], port: int, log: Path, env: Mapping[str, str] | None = None):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})}, start_new_session=True)
        self.health: list[int | None] = []

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.tail()}")
            try:
                status = requests.get(self.url + "/health", timeout=5).status_code
            except requests.RequestException:
                status = None
            if not self.health or self.health[-1] != status:
                self.health.append(status)
            if status == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the server was not ready within {timeout:g} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The server process and its descendants (the LitServe workers)."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

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

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
