"""Starting real server processes on 127.0.0.1 for the serving tests (the tests directory on their path, so a
server of test doubles can import them)."""

from __future__ import annotations

import os
from pathlib import Path

from affordvla.serve.launch import ServerProcess, free_port, serve_command

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

__all__ = ["ServerProcess", "free_port", "serve_command", "server_env"]


def server_env(root: Path, **extra: str) -> dict[str, str]:
    """This checkout's code and the tests on the server's path; its outputs under `root`."""
    path = os.pathsep.join(p for p in (str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "AFFORDVLA_ROOT": str(root), **extra}
