"""`module=action_policy` on its own: the command a user types, with no other override, trains a continuous action
policy (its default head), draws action traces through the callback its module config brings, and exports a policy
that `load_policy` reads. Run as a fresh process in a project folder of its own (AFFORDVLA_ROOT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from affordvla.policies import load_policy
from affordvla.policies.actions import ActionPolicy


@pytest.mark.slow
def test_module_action_policy_with_toy_actions_at_smoke_scale_runs_with_no_other_override(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AFFORDVLA_MLFLOW_URI", "HYDRA_FULL_ERROR")}
    env |= {"AFFORDVLA_ROOT": str(tmp_path), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "affordvla.train", "module=action_policy", "dataset=toy_actions", "debug=smoke"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]

    [run] = list((tmp_path / "outputs" / "runs").glob("*/*/metrics.json"))
    metrics = json.loads(run.read_text())
    assert {"val/action_mse", "test/action_mse", "val/mean_baseline_mse"} <= set(metrics)
    run_dir = run.parent
    assert list((run_dir / "action_traces").glob("*.png"))  # the trace callback came with module=action_policy
    assert not (run_dir / "overlays").exists()  # and no keypoint callback came with it
    record = json.loads((run_dir / "model" / "policy.json").read_text())
    assert record["kind"] == "actions" and record["head"]["class"] == "lstm"  # the module's default head
    policy = load_policy(run_dir / "model")
    assert isinstance(policy, ActionPolicy) and policy.info()["action_dim"] == 7
