"""The dense pointing pre-training stage on every backbone family: it trains what the projector reads, only the
vision tower changes, the dense losses fall, and the stage is recorded in MLflow."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from affordvla.backbones.factory import FAMILIES
from affordvla.backbones.pointing import build_pointing_backbone, tiny_writer

FAMILY_NAMES = sorted(FAMILIES)
SMALL = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "vision_layers": 2, "text_layers": 1,
         "intermediate_size": 64}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image_tokens(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """The image features the language model receives, one row per patch (CogVLM's boi/eoi left out)."""
    model = backbone.model
    if backbone.family == "cogvlm":
        return model.model.vision(pixels)[:, 1:-1]
    features = model.model.get_image_features(pixel_values=pixels).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features  # Llava: per image


def _projector(backbone):
    return backbone.model.model.vision.linear_proj if backbone.family == "cogvlm" \
        else backbone.model.model.multi_modal_projector


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patch_features_are_what_the_projector_reads(family, tmp_path):
    backbone = FAMILIES[family].from_pretrained(tiny_writer(family)(tmp_path / family, **SMALL)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone.vision_patch_features(pixels)
        assert features.shape == (2, 16, 32)  # a 4x4 grid of patches, no CLS row
        torch.testing.assert_close(_projector(backbone)(features), _image_tokens(backbone, pixels))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pointing_stage_trains_the_tower_only_and_lowers_its_losses(family, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    built = build_pointing_backbone(tmp_path / "pointed", family=family, steps=60, corpus_size=64, eval_size=8,
                                    batch_size=8, lr=3e-3, scene_size=32, tracking_uri=uri, **SMALL)
    fresh = dict(FAMILIES[family].from_pretrained(tiny_writer(family)(tmp_path / "fresh", **SMALL))
                 .model.named_parameters())
    loaded = FAMILIES[family].from_pretrained(built)
    trained = dict(loaded.model.named_parameters())
    assert trained.keys() == fresh.keys()
    tower = {name for name in trained if name.startswith(loaded.part_prefixes["vision_tower"])}
    changed = {name for name in fresh if not torch.equal(fresh[name], trained[name])}
    assert changed and changed <= tower, sorted(changed - tower)  # projector and language model: as written

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-pretrain").experiment_id])
    assert run.data.tags["backbone"] == f"{family}_tiny" and run.data.params["family"] == family
    history = {loss: [m.value for m in client.get_metric_history(run.info.run_id, f"pretrain/{loss}")]
               for loss in ("heatmap", "segmentation", "vote")}
    assert history["segmentation"][-1] < 0.5 * history["segmentation"][0], history
    assert history["vote"][-1] < 0.5 * history["vote"][0], history
    assert history["heatmap"][-1] < math.log(16), history  # below a uniform guess over the 16 patches
    assert 0 < run.data.metrics["pretrain/held_out_keypoint_error"] < 1.5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_text_pointing_stage_trains_the_whole_model_in_its_own_answer_format(family, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    built = build_pointing_backbone(tmp_path / "pointed", family=family, steps=2, text_steps=4, corpus_size=16,
                                    eval_size=4, batch_size=4, scene_size=32, tracking_uri=uri, **SMALL)
    fresh = dict(FAMILIES[family].from_pretrained(tiny_writer(family)(tmp_path / "fresh", **SMALL))
                 .model.named_parameters())
    loaded = FAMILIES[family].from_pretrained(built)
    language = [n for n, _ in loaded.model.named_parameters() if n.startswith(loaded.part_prefixes["language_model"])]
    assert any(not torch.equal(fresh[n], dict(loaded.model.named_parameters())[n]) for n in language)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-pretrain").experiment_id])
    assert run.data.params["text_steps"] == "4"
    # every held-out answer is scored: parsed ones by their distance, the rest at sqrt(2)
    assert 0 <= run.data.metrics["pretrain/held_out_pointing_error"] <= math.sqrt(2)
    assert client.get_metric_history(run.info.run_id, "pretrain/text_loss")


def test_command_line_builds_with_the_given_tiny_settings(tmp_path):
    from affordvla.backbones.pointing import main

    main([str(tmp_path / "cli"), "--family", "paligemma", "--steps", "2", "--corpus-size", "8", "--eval-every", "0",
          "--tiny", "image_size=32", "--tiny", "patch_size=8", "--tiny", "hidden_size=32", "--tiny", "kv_heads=4",
          "--threads", "1"])
    config = FAMILIES["paligemma"].from_pretrained(tmp_path / "cli").model.config
    assert (config.vision_config.image_size, config.text_config.num_key_value_heads) == (32, 4)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--tiny", "kv_heads"])
