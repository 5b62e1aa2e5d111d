"""Resume after `kill -9`: a training job killed at three random steps and resumed each time from its latest
complete checkpoint ends with the weights of an uninterrupted job, bit for bit, and MLflow shows one continued
run, each resumed run folder naming its parent."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from affordvla.checkpointing import STATE_NAME, WEIGHTS_NAME, load_state_dict

MAX_STEPS = 12


def _command(root: Path, run_dir: Path, tiny_backbone_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "affordvla.train", "debug=smoke", f"backbone.pretrained={tiny_backbone_dir}",
            "backbone.build=null", "dataset.generate.image_size=64", "dataset.generate.splits.train=20",
            f"trainer.max_steps={MAX_STEPS}", "++trainer.limit_val_batches=0", "test=false", "export_dir=null",
            "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={run_dir}", *extra]  # 5 batches an epoch: the kills fall mid-epoch too


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AFFORDVLA_MLFLOW_URI", "HYDRA_FULL_ERROR")}
    return env | {"AFFORDVLA_ROOT": str(root), "TOKENIZERS_PARALLELISM": "false"}


def _complete_checkpoints(run_dirs: list[Path]) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint: a `.partial` folder is one a kill interrupted."""
    found = []
    for run_dir in run_dirs:
        for folder in (run_dir / "checkpoints").glob("step_*"):
            if folder.name.endswith(".partial"):
                continue
            assert (folder / WEIGHTS_NAME).is_file() and (folder / STATE_NAME).is_file(), folder
            found.append((int(folder.name.removeprefix("step_")), folder))
    return sorted(found)


def _run_and_kill(command: list[str], env: dict[str, str], cwd: Path, run_dir: Path, step: int) -> None:
    """Start the job and SIGKILL it as soon as its folder holds a complete checkpoint of `step` or later."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "wb") as log:
        job = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        try:
            while not any(s >= step for s, _ in _complete_checkpoints([run_dir])):
                assert job.poll() is None, f"job ended (exit {job.returncode}) before step {step}: {log.name}"
                assert time.monotonic() < deadline, f"no checkpoint of step {step} within 900 s"
                time.sleep(0.05)
            os.kill(job.pid, signal.SIGKILL)
        finally:
            if job.poll() is None:
                job.kill()  # after a failed wait as well: no job outlives the test
            job.wait()
    assert job.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_three_times_and_resumed_equals_uninterrupted(tmp_path, tiny_backbone_dir):
    kill_steps = sorted(random.Random(19).sample(range(2, MAX_STEPS - 1), 3))
    straight_root, chain_root = tmp_path / "straight", tmp_path / "chain"
    for root in (straight_root, chain_root):
        root.mkdir()
    straight_dir = straight_root / "outputs" / "runs" / "straight"
    done = subprocess.run(_command(straight_root, straight_dir, tiny_backbone_dir), env=_env(straight_root),
                          cwd=straight_root, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    env, run_dirs = _env(chain_root), []
    for attempt, step in enumerate(kill_steps):
        run_dir = chain_root / "outputs" / "runs" / f"attempt{attempt}"
        resume = [f"ckpt_path={_complete_checkpoints(run_dirs)[-1][1]}"] if run_dirs else []
        _run_and_kill(_command(chain_root, run_dir, tiny_backbone_dir, *resume), env, chain_root, run_dir, step)
        run_dirs.append(run_dir)
    last_dir = chain_root / "outputs" / "runs" / "final"
    latest = _complete_checkpoints(run_dirs)[-1][1]
    done = subprocess.run(_command(chain_root, last_dir, tiny_backbone_dir, f"ckpt_path={latest}"), env=env,
                          cwd=chain_root, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dirpath has changed" not in done.stdout + done.stderr
    run_dirs.append(last_dir)

    final = f"step_{MAX_STEPS:06d}"
    expected = load_state_dict(straight_dir / "checkpoints" / final / WEIGHTS_NAME)
    actual = load_state_dict(last_dir / "checkpoints" / final / WEIGHTS_NAME)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    # the tracking: one MLflow run, continued by every resumed job, finished; each folder names its parent
    client = MlflowClient(f"sqlite:///{chain_root}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-train").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == str(latest.resolve())
    assert run.data.tags["scale"] == "smoke"
    # the losses are the uninterrupted run's, step for step. A job killed right after writing a checkpoint had not
    # logged that step yet (Lightning logs after the checkpoint callbacks) and the resumed job starts after it:
    # at most one step per kill is missing
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    straight_client = MlflowClient(f"sqlite:///{straight_root}/outputs/mlflow.db")
    (straight_run,) = straight_client.search_runs([straight_client.get_experiment_by_name("affordvla-train")
                                                   .experiment_id])
    reference = {m.step: m.value for m in straight_client.get_metric_history(straight_run.info.run_id, "train/loss")}
    assert set(reference) == set(range(MAX_STEPS))
    assert {step: reference[step] for step in logged} == logged
    assert len(reference) - len(logged) <= len(kill_steps)
    for parent, child in itertools.pairwise(run_dirs):
        info = json.loads((child / "run_info.json").read_text())
        assert info["parent_run_dir"] == str(parent)
        assert info["parent_mlflow_run_id"] == run.info.run_id
        assert Path(info["resumed_from"]).parent.parent == parent
    assert "parent_run_dir" not in json.loads((run_dirs[0] / "run_info.json").read_text())
