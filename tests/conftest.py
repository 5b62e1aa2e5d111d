"""Shared fixtures: one tiny pretrained backbone per test session, and composed training configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from affordvla.train import CONFIG_DIR

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on busy cores the threads' barriers make every small
    op wait (measured: 4 s against 150 s for the CogVLM overfitting test on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Learning assertions: float results differ between CPUs (kernels, reduction order), so a test that a model
# learned must sit far from its threshold on any machine. `assert_learned` is the one way such a test asserts;
# with AFFORDVLA_MARGIN_LOG set it also appends each observation to that JSONL file, and with
# AFFORDVLA_TEST_SEED_OFFSET every torch.manual_seed call is shifted, so the margins can be measured over seeds
# and thread counts (docs/test-margins.md records them and the command).
MARGIN_LOG = os.environ.get("AFFORDVLA_MARGIN_LOG")
SEED_OFFSET = int(os.environ.get("AFFORDVLA_TEST_SEED_OFFSET", "0"))


def assert_learned(name: str, observed: float, limit: float, detail: object = None) -> None:
    """Assert `observed < limit` for the learning check `name` (a ratio of losses, an error, ...)."""
    if MARGIN_LOG:
        with open(MARGIN_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps({"name": name, "observed": float(observed), "limit": float(limit),
                                  "seed_offset": SEED_OFFSET, "threads": torch.get_num_threads()}) + "\n")
    assert observed < limit, (name, float(observed), limit, detail)


def fell_by(values: list[float], window: int = 1) -> float:
    """The median of the last `window` values over the first value: how far a loss fell (below 1 is down). The
    median, since one step's spike (an Adam overshoot on a tiny batch) says nothing about what was learned."""
    return float(np.median(values[-window:]) / values[0])


if SEED_OFFSET:
    _manual_seed = torch.manual_seed

    def _shifted_seed(seed):
        return _manual_seed(int(seed) + SEED_OFFSET)

    torch.manual_seed = _shifted_seed


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A tiny PaliGemma with a few steps of the dense pointing stage (fast; learning is tested elsewhere)."""
    from affordvla.pretraining.pointing import build_pointing_backbone

    out = tmp_path_factory.mktemp("backbones") / "paligemma-tiny"
    return build_pointing_backbone(out, steps=3, corpus_size=16, eval_size=4, batch_size=4, scene_size=64,
                                    image_size=32, patch_size=8)


# A tiny backbone config's pointing pre-training shrunk to a few steps on a few scenes (learning is tested elsewhere).
FAST_POINTING_BUILD = ["backbone.build.steps=3", "backbone.build.corpus_size=16", "backbone.build.eval_size=4",
                       "backbone.build.batch_size=4", "backbone.build.scene_size=64", "backbone.build.eval_every=0",
                       "++backbone.build.text_steps=0", "++backbone.build.teacher_steps=0"]


def compose_train(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose the real configs as `affordvla-train` would, with Hydra's runtime info set for `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def smoke_overrides(tmp_path, tiny_backbone_dir) -> list[str]:
    """Small, fast training: the tiny backbone above, a 40-scene generated dataset, 4 steps."""
    return [
        "debug=smoke",
        f"paths.root_dir={tmp_path}",
        f"backbone.pretrained={tiny_backbone_dir}",
        "backbone.build=null",
        "dataset.generate.image_size=64",
        "callbacks.progress_bar.refresh_rate=0",
    ]


def keypoint_head_and_batch(backbone, codec: str = "robopoint"):
    """A keypoint-text head bound to `backbone` and a fixed batch of four generated scenes (seed 5, 32 px)."""
    from affordvla.formats.kalie_tasks import TASKS
    from affordvla.formats.sample import KeypointSample
    from affordvla.heads.keypoint_text import KeypointTextHead
    from affordvla.offline.tabletop import make_scenes
    from affordvla.policies.keypoints import KeypointBatchCollator

    head = KeypointTextHead(codec=codec)
    head.bind(backbone)
    samples = [KeypointSample(image=s.image, instruction=TASKS[s.task].instruction, keypoints=s.keypoints,
                              task=s.task) for s in make_scenes(5, 4, 32)]
    return head, samples, KeypointBatchCollator(backbone, head)(samples)


def overfit_keypoint_batch(backbone, head, batch, optimizer, steps: int) -> list[float]:
    """Train backbone + keypoint head on one fixed batch; returns the loss of every step."""
    losses = []
    for _ in range(steps):
        out = backbone(batch["pixel_values"], batch["inputs"])
        loss = head.loss(out.logits, batch["inputs"]["labels"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def log_finished_run(client, experiment_name: str, tags: dict, metrics: dict, start: int,
                     status: str = "FINISHED") -> str:
    """A run written straight into an MLflow store (no training): tags, one value per metric, an end status."""
    from affordvla.tracking.mlflow_setup import ensure_experiment

    run = client.create_run(ensure_experiment(client, experiment_name), start_time=start, tags=tags)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id
