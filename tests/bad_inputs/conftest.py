"""The bad-input corpus: mistakes users really make, each run as the command a user types, in a fresh process.

Every case asserts the same four things (`assert_clear_failure`): the command exits non-zero; its message names
the file, entry or option at fault; no traceback is printed (none was asked for); and nothing outside the
project's output folder was created or changed (a checksum of the user's folders before and after, and of the
working directory). `make bench BENCH=reliability` runs this folder and counts the cases.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# the console scripts, run as modules so the tree under test is the one imported
COMMANDS = {
    "affordvla-train": "affordvla.train",
    "affordvla-eval": "affordvla.evaluate",
    "affordvla-data": "affordvla.data.cli",
    "affordvla-table": "affordvla.tables",
    "affordvla-reproduce": "affordvla.reproduce",
    "affordvla-synthesize": "affordvla.synthesis.cli",
    "affordvla-convert-llava": "affordvla.backbones.llava.convert",
    "affordvla-export": "affordvla.export",
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def tree_checksum(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (and `root` itself) with a digest of its bytes ('dir' for folders)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    found = {".": "dir"}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


class Workspace:
    """A user's machine in miniature: `home` is the folder the command is typed in, `project` the root of the
    project's output folder (AFFORDVLA_ROOT, so outputs land in `project/outputs`), and `user(...)` folders hold
    the user's own data, watched by checksum."""

    def __init__(self, base: Path):
        self.home = base / "home"
        self.project = base / "project"
        self.home.mkdir(parents=True)
        self.project.mkdir(parents=True)
        self._watched: dict[Path, dict[str, str]] = {}

    def user(self, name: str) -> Path:
        path = self.home / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def watch(self, *paths: Path) -> None:
        """Record the state of the user's paths (and the working folder) before the command runs."""
        for path in (self.home, *paths):
            self._watched[path] = tree_checksum(path)

    def run(self, command: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> Result:
        if not self._watched:
            self.watch()
        environment = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "AFFORDVLA_DEBUG")}
        environment.pop("AFFORDVLA_MLFLOW_URI", None)  # the store must follow AFFORDVLA_ROOT by itself
        environment.update({"AFFORDVLA_ROOT": str(self.project), "TOKENIZERS_PARALLELISM": "false"})
        environment.update(env or {})
        done = subprocess.run([sys.executable, "-m", COMMANDS[command], *args], cwd=self.home, env=environment,
                              capture_output=True, text=True, timeout=timeout, check=False)
        return Result(done.returncode, done.stdout, done.stderr)

    def unchanged(self) -> list[str]:
        """The watched paths whose contents differ from when they were recorded."""
        return [str(path) for path, before in self._watched.items() if tree_checksum(path) != before]


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path)


def assert_clear_failure(workspace: Workspace, result: Result, *names: str, created: tuple[Path, ...] = ()) -> None:
    """The command failed with an error that names each of `names`, without a traceback, and touched nothing of
    the user's (`created`: paths that must not exist afterwards, such as a mistyped path's siblings)."""
    assert result.returncode != 0, f"exit status 0; output:\n{result.output[-3000:]}"
    assert "Traceback" not in result.output, result.output[-3000:]
    for name in names:
        assert name in result.stderr or name in result.stdout, f"{name!r} not named in:\n{result.output[-3000:]}"
    assert not workspace.unchanged(), f"changed: {workspace.unchanged()}"
    for path in created:
        assert not path.exists(), f"{path} was created"
