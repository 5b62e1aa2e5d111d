"""Starting real server processes on 127.0.0.1 for the serving tests (the tests directory on their path, so a
server of test doubles can import them)."""

from __future__ import annotations

import os
from pathlib import Path

from affordvla.serve.launch import ServerProcess, free_port, serve_command

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

__all__ = ["KEY", "LIMITS", "ServerProcess", "free_port", "serve_command", "server_env", "train_export"]


def server_env(root: Path, **extra: str) -> dict[str, str]:
    """This checkout's code and the tests on the server's path; its outputs under `root`."""
    path = os.pathsep.join(p for p in (str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "AFFORDVLA_ROOT": str(root), **extra}


KEY = "test-key-1234"
# small enough that the bad-request tests can exceed them cheaply; the tiny policies see 64 px images
LIMITS = {"max_body_bytes": 200_000, "max_image_pixels": 96 * 96, "max_image_side": 96}


def train_export(root: Path, backbone_dir: Path, overrides: list[str]) -> tuple[Path, object]:
    """affordvla-train for a few steps with `overrides` (logger off, no test stage); its export and config."""
    from conftest import compose_train

    from affordvla.train import train

    cfg = compose_train([f"paths.root_dir={root}", f"backbone.pretrained={backbone_dir}", "backbone.build=null",
                         "logger=none", "callbacks.progress_bar.refresh_rate=0", "test=false", *overrides],
                        root / "run")
    train(cfg)
    return Path(cfg.export_dir), cfg
