"""Action heads on the toy action data: each head's action MSE next to the mean baseline measured on the same
validation frames, and step-wise inference speed of the exported policy (a session's `act()` per second on CPU).

Every head trains through the real entrypoint (`affordvla-train experiment=toy_actions_<head>`) on the tiny
pretrained backbone, so the figures are what a user gets from those commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HEADS = ("lstm", "gpt", "mlp", "discrete", "text_actions")
RUNS = Path("outputs/runs")


def _train(head: str) -> Path:
    task = f"bench_head_{head}"
    subprocess.run([sys.executable, "-m", "affordvla.train", f"experiment=toy_actions_{head}", f"task_name={task}",
                    "callbacks.progress_bar.refresh_rate=100"], check=True)
    return max((RUNS / task).glob("*/metrics.json")).parent


def _steps_per_second(run_dir: Path, head: str, steps: int = 40) -> float:
    """Rebuild the exported policy from its files and time `act()` over the frames of validation episodes."""
    import torch
    from omegaconf import OmegaConf

    from affordvla.data.calvin import CalvinWindowDataset
    from affordvla.policies import load_policy

    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    policy = load_policy(run_dir / "model")
    session = policy.session()
    camera = policy.camera
    frames = CalvinWindowDataset(Path(cfg.dataset.root) / "validation", 1, 1, cameras=(camera,))
    observations = [{"image": frames[i].images[camera][0], "instruction": frames[i].instruction,
                     "state": frames[i].state[0]} for i in range(steps + 5)]
    with torch.inference_mode():
        for observation in observations[:5]:  # warm-up
            session.act(observation)
        session.reset()
        started = time.perf_counter()
        for observation in observations[5:]:
            session.act(observation)
    return steps / (time.perf_counter() - started)


def _latest_run(head: str) -> Path | None:
    runs = list((RUNS / f"bench_head_{head}").glob("*/model/policy.json"))
    return max(runs).parent.parent if runs else None


def run(heads: tuple[str, ...] = HEADS, reuse_runs: bool = False) -> dict[str, float]:
    """Train every head and measure it; `reuse_runs` measures the latest finished bench run of a head instead
    of training it again (for re-measuring speed)."""
    figures: dict[str, float] = {}
    for head in heads:
        run_dir = (_latest_run(head) if reuse_runs else None) or _train(head)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        mse, baseline = metrics["val/action_mse"], metrics["val/mean_baseline_mse"]
        figures.update({
            f"head.{head}.action_mse": mse,
            f"head.{head}.mean_baseline_mse": baseline,
            f"head.{head}.ratio_to_baseline": mse / baseline if baseline else float(np.nan),
            f"head.{head}.gripper_accuracy": metrics["val/gripper_accuracy"],
            f"head.{head}.train_seconds": metrics["train_seconds"],
            f"head.{head}.steps_per_s": _steps_per_second(run_dir, head),
        })
        if "val/parse_failure_rate" in metrics:
            figures[f"head.{head}.parse_failure_rate"] = metrics["val/parse_failure_rate"]
    return figures
