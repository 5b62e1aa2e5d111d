"""Starting real server processes on 127.0.0.1 for the serving tests (the tests directory on their path, so a
server of test doubles can import them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from affordvla.serve.launch import ServerProcess, free_port, serve_command

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

__all__ = ["KEY", "LIMITS", "ServerProcess", "free_port", "serve_command", "served", "server_env", "tiny_exports"]


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


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_backbone_dir) -> dict[str, Path]:
    """A keypoint-text policy (the default's head, smoke data at 64 px) and an LSTM action policy, each trained a
    few steps and exported by affordvla-train; `samples` is the keypoint run's toy KALIE data."""
    kp, kp_cfg = train_export(tmp_path_factory.mktemp("serve_kp"), tiny_backbone_dir,
                              ["debug=smoke", "dataset.generate.image_size=64"])
    lstm, _ = train_export(tmp_path_factory.mktemp("serve_lstm"), tiny_backbone_dir,
                           ["experiment=toy_actions_lstm", "dataset.generate.train_episodes=2",
                            "dataset.generate.val_episodes=1", "dataset.generate.episode_length=8",
                            "dataset.batch_size=4", "trainer.max_steps=3", "trainer.val_check_interval=3",
                            "head.hidden_size=16"])
    return {"kp": kp, "lstm": lstm, "samples": Path(kp_cfg.dataset.root)}


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_exports) -> ServerProcess:
    """affordvla-serve on both exports, as a user starts it: batching on (up to 16 requests wait at most 0.5 s to
    share a forward pass), an API key, the demo with the keypoint run's test split, small request limits."""
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    overrides = ["accelerator=cpu", "max_batch_size=16", "batch_timeout=0.5",
                 f"demo.samples={tiny_exports['samples']}", *[f"limits.{k}={v}" for k, v in LIMITS.items()]]
    server = ServerProcess(serve_command({"kp": tiny_exports["kp"], "lstm": tiny_exports["lstm"]}, port, overrides),
                           port, root / "server.log", env=server_env(root, AFFORDVLA_SERVE_API_KEY=KEY))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
