"""Bad-input corpus: mistyped options and bad arguments of the commands (affordvla-train's component options,
affordvla-table --run-missing, affordvla-export). Each exits non-zero with one line naming the option or file,
and leaves the user's folders as they were."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import assert_clear_failure

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override,named,suggested", [
    ("+trainer.max_step=3", "trainer.max_step", "trainer.max_steps"),  # what Hydra's own message suggests typing
    ("+module.optimizer.lrr=0.1", "module.optimizer.lrr", "module.optimizer.lr"),
    ("+head.codex=robopoint", "head.codex", "head.codec"),
    ("+callbacks.model_checkpoint.every_n_train_step=5", "callbacks.model_checkpoint.every_n_train_step",
     "callbacks.model_checkpoint.every_n_train_steps"),
])
def test_unknown_component_option_names_it_and_the_close_match(workspace, override, named, suggested):
    result = workspace.run("affordvla-train", override)
    assert_clear_failure(workspace, result, f"{named} is not an option", f"did you mean {suggested}?")
    assert "TypeError" not in result.output
    assert not (workspace.project / "outputs" / "artifacts").exists()  # before any backbone work


def test_table_run_missing_exits_non_zero_when_its_cells_failed(workspace):
    """Every cell trained by --run-missing failed: the table is still written (cells marked failed), and the
    command says so and exits 1."""
    folder = workspace.user("my_table")
    spec = {"title": "one cell", "smoke_overrides": ["scale=smoke"],
            "columns": [{"name": "error", "metric": "test/keypoint_error", "lower_is_better": True}],
            "rows": [{"name": "llava tiny", "experiment": "robopoint_llava_tiny", "published": {"error": 0.5}}]}
    (folder / "table.yaml").write_text(yaml.safe_dump(spec))
    workspace.watch(folder)
    result = workspace.run("affordvla-table", str(folder), "--scale", "smoke", "--run-missing",
                           "--override", "+trainer.max_step=3")
    assert_clear_failure(workspace, result, "1 cell(s) failed to train", "llava tiny")
    written = workspace.project / "outputs" / "tables" / "my_table"
    assert "FAILED" in (written / "table.md").read_text()
    assert "trainer.max_step is not an option" in (written / "logs" / "robopoint_llava_tiny.log").read_text()


def test_table_help_shows_an_example_folder_that_exists(workspace):
    result = workspace.run("affordvla-table", "--help")
    assert result.returncode == 0
    examples = re.findall(r"experiments/[\w/]+", result.stdout)
    assert examples, result.stdout
    for example in examples:
        assert (REPOSITORY / example / "table.yaml").is_file(), example


# ---------------------------------------------------------------------------------------------- affordvla-export

def _recorded_run(folder: Path, lora: dict | None = None) -> Path:
    """A run folder as affordvla-train leaves one (config_resolved.yaml, checkpoints/step_N with weights and
    training state); the weights are placeholders, as every case here fails before they are used."""
    from affordvla.checkpointing import STATE_NAME, WEIGHTS_NAME, save_state_dict

    folder.mkdir(parents=True)
    config = {"backbone": {"_target_": "affordvla.backbones.factory.load_backbone", "family": "paligemma",
                           "pretrained": str(folder / "base"), "lora": lora},
              "head": {"_target_": "affordvla.heads.keypoint_text.KeypointTextHead"},
              "module": {"_target_": "affordvla.policies.keypoints.KeypointPolicyModule"},
              "paths": {"output_dir": str(folder)}}
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    checkpoint = folder / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    save_state_dict({"w": torch.zeros(3)}, checkpoint / WEIGHTS_NAME)
    torch.save({"global_step": 4, "dataset_metadata": {}}, checkpoint / STATE_NAME)
    return checkpoint


def test_export_of_a_run_id_without_a_store(workspace):
    """No store where AFFORDVLA_ROOT points: said so, and no empty store is created."""
    result = workspace.run("affordvla-export", "--run-id", "0123456789abcdef")
    assert_clear_failure(workspace, result, "--run-id 0123456789abcdef", "no MLflow store",
                         str(workspace.project / "outputs" / "mlflow.db"),
                         created=(workspace.project / "outputs" / "mlflow.db",))


def test_export_of_a_run_id_that_does_not_exist(workspace):
    from mlflow import MlflowClient

    store = workspace.project / "outputs" / "mlflow.db"
    store.parent.mkdir(parents=True)
    MlflowClient(f"sqlite:///{store}").search_experiments()  # an existing, empty store
    result = workspace.run("affordvla-export", "--run-id", "0123456789abcdef")
    assert_clear_failure(workspace, result, "--run-id 0123456789abcdef: no such run", str(store))


def test_export_of_a_checkpoint_that_does_not_exist(workspace):
    missing = workspace.home / "runs" / "r1" / "checkpoints" / "step_000300"
    result = workspace.run("affordvla-export", "--checkpoint", str(missing))
    assert_clear_failure(workspace, result, f"--checkpoint={missing} does not exist", created=(missing,))


def test_export_of_a_partial_checkpoint(workspace):
    checkpoint = _recorded_run(workspace.user("runs") / "r1")
    partial = checkpoint.with_name("step_000006.partial")
    checkpoint.rename(partial)
    result = workspace.run("affordvla-export", "--checkpoint", str(partial))
    assert_clear_failure(workspace, result, f"--checkpoint={partial} is a partial checkpoint")


def test_export_of_a_checkpoint_without_its_run_config(workspace):
    checkpoint = _recorded_run(workspace.user("runs") / "r1")
    (checkpoint.parent.parent / "config_resolved.yaml").unlink()
    result = workspace.run("affordvla-export", "--checkpoint", str(checkpoint))
    assert_clear_failure(workspace, result, str(checkpoint.parent.parent / "config_resolved.yaml"), "--config")


def test_export_into_a_folder_of_the_users_files(workspace):
    checkpoint = _recorded_run(workspace.user("runs") / "r1")
    out = workspace.user("deliverables")
    (out / "report.pdf").write_bytes(b"%PDF-1.4")
    workspace.watch(out, checkpoint.parent.parent)
    result = workspace.run("affordvla-export", "--checkpoint", str(checkpoint), "--out", str(out))
    assert_clear_failure(workspace, result, f"--out={out} already holds files not written by an export",
                         "report.pdf")


def test_export_into_a_file(workspace):
    checkpoint = _recorded_run(workspace.user("runs") / "r1")
    out = workspace.user("deliverables") / "model.zip"
    out.write_bytes(b"PK")
    result = workspace.run("affordvla-export", "--checkpoint", str(checkpoint), "--out", str(out))
    assert_clear_failure(workspace, result, f"--out={out} is a file")


def test_adapter_only_export_of_a_run_without_lora(workspace):
    checkpoint = _recorded_run(workspace.user("runs") / "r1", lora=None)
    result = workspace.run("affordvla-export", "--checkpoint", str(checkpoint), "--adapter-only")
    assert_clear_failure(workspace, result, "--adapter-only", "trained no LoRA adapter", "backbone.lora")
    assert not (workspace.project / "outputs" / "exports").exists()
