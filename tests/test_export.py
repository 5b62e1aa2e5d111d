"""affordvla-export: from a run's checkpoint, the same export affordvla-train writes (LoRA merged), or the
adapter alone, which on its base checkpoint computes what the merged export computes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train
from mlflow import MlflowClient
from safetensors.torch import load_file

from affordvla.export import EXPORT_MARKER, export_checkpoint, main
from affordvla.train import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_backbone_dir):
    """A LoRA run at debug=smoke: 4 steps, checkpoints at steps 2 and 4, its own export of step 4."""
    root = tmp_path_factory.mktemp("lora_run")
    overrides = ["debug=smoke", f"paths.root_dir={root}", f"backbone.pretrained={tiny_backbone_dir}",
                 "backbone.build=null", "dataset.generate.image_size=64", "callbacks.progress_bar.refresh_rate=0",
                 "test=false", "backbone.lora={rank: 4, alpha: 8, dropout: 0.0}"]
    cfg = compose_train(overrides, root / "run")
    train(cfg)
    return root, cfg


def test_export_of_the_last_checkpoint_equals_the_runs_own_export(lora_run, tmp_path):
    root, cfg = lora_run
    out = export_checkpoint(root / "run" / "checkpoints" / "step_000004", tmp_path / "export")
    ours, theirs = load_file(out / "model.safetensors"), load_file(f"{cfg.export_dir}/model.safetensors")
    assert ours.keys() == theirs.keys() and not any("lora" in key for key in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (root / "run" / "model").iterdir())
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["merged"] and record["complete"] and record["step"] == 4
    export_checkpoint(root / "run" / "checkpoints" / "step_000004", out)  # over an earlier export: allowed


def test_adapter_only_export_on_its_base_matches_the_merged_export(lora_run, tmp_path):
    from affordvla.backbones.factory import load_backbone
    from affordvla.offline.tabletop import make_scenes

    root, cfg = lora_run
    checkpoint = root / "run" / "checkpoints" / "step_000004"
    adapter = export_checkpoint(checkpoint, tmp_path / "adapter", adapter_only=True)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    assert not json.loads((adapter / EXPORT_MARKER).read_text())["merged"]
    with_adapter = load_backbone("paligemma", cfg.backbone.pretrained, adapter=str(adapter), prefix_lm=False)
    merged = load_backbone("paligemma", cfg.export_dir, prefix_lm=False)
    scenes = list(make_scenes(3, 2, 64))
    pixels = merged.preprocess_images([s.image for s in scenes])
    inputs = merged.build_inputs(["point to the mug"] * 2, ["<loc0100><loc0200>"] * 2)
    with torch.no_grad():
        a = with_adapter.eval()(pixels, inputs).logits
        b = merged.eval()(pixels, inputs).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_the_command_exports_a_run_id_from_its_store(lora_run, tmp_path, monkeypatch):
    root, cfg = lora_run
    client = MlflowClient(cfg.paths.mlflow_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    monkeypatch.setenv("AFFORDVLA_ROOT", str(root))  # the store follows the project folder
    monkeypatch.delenv("AFFORDVLA_MLFLOW_URI", raising=False)
    assert main(["--run-id", run.info.run_id, "--step", "2"]) == 0
    out = root / "outputs" / "exports" / "run-step_000002"
    assert json.loads((out / EXPORT_MARKER).read_text())["run_id"] == run.info.run_id
    assert (out / "dataset_metadata.json").is_file()
    step_two = load_file(out / "model.safetensors")
    final = load_file(f"{cfg.export_dir}/model.safetensors")
    assert any(not torch.equal(step_two[k], final[k]) for k in final)  # step 2's weights, not the final ones
