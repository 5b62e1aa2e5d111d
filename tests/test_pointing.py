"""The dense pointing pre-training stage on every backbone family: it trains what the projector reads, only the
vision tower changes, the dense losses fall, and the stage is recorded in MLflow."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
import torch
from conftest import assert_learned, fell_by
from mlflow import MlflowClient

from affordvla.backbones.factory import FAMILIES
from affordvla.pretraining.pointing import ConvPointingTeacher, build_pointing_backbone, tiny_writer

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
    # losses of single batches of 8 (logged at steps 0, 50 and 59): the last two, averaged, against the first.
    # The heatmap over 16 patches needs hundreds of steps to leave the uniform guess, too slow for this test; the
    # shipped checkpoints' pointing test below covers what the whole recipe learns.
    assert_learned(f"pointing/{family}/segmentation", fell_by(history["segmentation"], window=2), 0.5, history)
    assert_learned(f"pointing/{family}/vote", fell_by(history["vote"], window=2), 0.5, history)
    assert all(math.isfinite(v) for v in history["heatmap"]), history
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
    from affordvla.pretraining.pointing import main

    main([str(tmp_path / "cli"), "--family", "paligemma", "--steps", "2", "--corpus-size", "8", "--eval-every", "0",
          "--tiny", "image_size=32", "--tiny", "patch_size=8", "--tiny", "hidden_size=32", "--tiny", "kv_heads=4",
          "--threads", "1"])
    config = FAMILIES["paligemma"].from_pretrained(tmp_path / "cli").model.config
    assert (config.vision_config.image_size, config.text_config.num_key_value_heads) == (32, 4)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--tiny", "kv_heads"])


def test_recorded_command_rebuilds_the_checkpoint_bit_for_bit(tmp_path):
    """Every built checkpoint carries its recipe and the CLI line that makes it again (how the shipped ones are
    regenerated); that line, run, writes identical weights."""
    from affordvla.pretraining.pointing import RECORD_FILE, main

    built = build_pointing_backbone(tmp_path / "first" / "ckpt", family="paligemma", steps=3, text_steps=2,
                                    text_tower_lr=0.0, teacher_steps=2, corpus_size=16, eval_size=4, batch_size=4,
                                    scene_size=32, use_shipped=False, **SMALL)
    record = json.loads((built / RECORD_FILE).read_text())
    assert record["params"]["steps"] == 3 and record["params"]["intermediate_size"] == 64
    assert record["params"]["teacher_steps"] == 2 and record["params"]["distill_weight"] == 10.0
    assert math.isfinite(record["dense_error"]) and 0 <= record["text_error"] <= math.sqrt(2)
    argv = shlex.split(record["command"])
    assert argv[:4] == ["python", "-m", "affordvla.pretraining.pointing", "ckpt"]
    again = tmp_path / "again" / "ckpt"
    main([str(again), *argv[4:], "--eval-every", "0", "--threads", "1"])
    assert (again / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("image_size", "grid"), [(128, 8), (32, 4), (224, 16)])
def test_the_teacher_gives_one_feature_per_cell_of_the_towers_grid(image_size, grid):
    teacher = ConvPointingTeacher(grid, image_size, width=16, channels=(4, 8, 8)).eval()
    assert teacher(torch.zeros(2, 3, image_size, image_size)).shape == (2, grid * grid, 16)
    # the convolutions themselves halve down to the grid; pooling only rounds off (224 px: 28 cells -> 16)
    assert teacher.body(torch.zeros(1, 3, image_size, image_size)).shape[-1] == {128: 8, 32: 4, 224: 28}[image_size]
    if grid < 8:
        return  # the receptive field spans the whole grid
    # cells are row-major, like the tower's patches: a mark in the top-right corner reaches the top-right cell's
    # feature and not the far corners' (the receptive field spans a few cells)
    image = torch.zeros(1, 3, image_size, image_size)
    image[..., : image_size // grid, -(image_size // grid):] = 1.0
    changed = (teacher(image) - teacher(torch.zeros_like(image))).abs().sum(-1)[0].reshape(grid, grid)
    assert changed[0, -1] > 0 and changed[-1, 0] == changed[-1, -1] == changed[0, 0] == 0


def test_subcell_features_are_each_cells_finer_map():
    """Sub-cell features hand every cell of the tower's grid the teacher's finer map inside it: at 128 px and
    grid 8, cell (row, col)'s 2x2 sub-cells are the third stage's 16x16 map at rows 2*row..2*row+1 and columns
    2*col..2*col+1, channel-major, cells row-major like the tower's patches."""
    teacher = ConvPointingTeacher(8, 128, width=16, channels=(4, 8, 6)).eval()
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        subcells = teacher.subcell_features(image, 2)
        third_stage = teacher.body[:3](image)
    assert third_stage.shape == (2, 6, 16, 16) and subcells.shape == (2, 64, 6 * 4)
    for row, col in [(0, 0), (0, 7), (3, 5), (7, 7)]:
        expected = third_stage[:, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(2, -1)
        assert torch.equal(subcells[:, row * 8 + col], expected)
    with torch.no_grad():  # 4 sub-cells: the 32x32 map of the second stage; 1: the last stage, as forward() pools it
        assert torch.equal(teacher.subcell_features(image, 4)[:, 9].reshape(2, 8, 4, 4),
                           teacher.body[:2](image)[:, :, 4:8, 4:8])
        assert torch.equal(teacher.subcell_features(image, 1), teacher(image))
    with pytest.raises(ValueError, match="no stage of the teacher is 512 cells wide"):
        teacher.subcell_features(image, 64)


def test_teacher_features_are_distilled_into_the_tower(tmp_path):
    """With `teacher_steps`, a CNN learns the dense targets first, then the tower learns them and reproduces its
    features: both stages' losses fall, the teacher's figures are recorded, and the checkpoint keeps the family's
    layout (teacher and adapter are discarded)."""
    from affordvla.pretraining.pointing import RECORD_FILE

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    built = build_pointing_backbone(tmp_path / "ckpt", family="paligemma", steps=300, teacher_steps=40, corpus_size=64,
                                    eval_size=8, batch_size=8, scene_size=32, tracking_uri=uri, use_shipped=False,
                                    distill_subcells=2, **SMALL)
    record = json.loads((built / RECORD_FILE).read_text())
    assert 0 < record["teacher_error"] < 1.5 and "--tiny teacher_steps=40" in record["command"]
    assert record["params"]["distill_subcells"] == 2 and "--tiny distill_subcells=2" in record["command"]
    fresh = FAMILIES["paligemma"].from_pretrained(tiny_writer("paligemma")(tmp_path / "fresh", **SMALL)).model
    loaded = FAMILIES["paligemma"].from_pretrained(built).model
    assert {n: p.shape for n, p in loaded.state_dict().items()} == {n: p.shape for n, p in fresh.state_dict().items()}
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-pretrain").experiment_id])
    history = {key: [m.value for m in client.get_metric_history(run.info.run_id, f"pretrain/{key}")]
               for key in ("teacher_segmentation", "distillation", "segmentation")}
    assert_learned("distillation/teacher_segmentation", fell_by(history["teacher_segmentation"]), 0.5, history)
    # single batches of 8 are noisy: the mean of the last three logged losses against the untrained first one
    assert_learned("distillation/distillation", fell_by(history["distillation"], window=3), 0.8, history)
    assert run.data.metrics["pretrain/teacher_held_out_keypoint_error"] == pytest.approx(record["teacher_error"])


def test_a_shipped_checkpoint_of_the_same_recipe_is_copied_not_trained(tmp_path, monkeypatch):
    from affordvla.pretraining import pointing

    recipe = {"family": "paligemma", "steps": 2, "corpus_size": 8, "eval_size": 4, "batch_size": 4, "scene_size": 32,
              **SMALL}
    shipped = build_pointing_backbone(tmp_path / "shipped" / "recipe-name", **recipe)
    monkeypatch.setattr(pointing, "SHIPPED_DIR", tmp_path / "shipped")

    def no_training(*args, **kwargs):
        raise AssertionError("a shipped checkpoint must be copied, not trained again")

    monkeypatch.setattr(pointing, "make_scenes", no_training)
    copied = build_pointing_backbone(tmp_path / "artifacts" / "recipe-name", **recipe)
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in shipped.iterdir())
    assert (copied / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    with pytest.raises(AssertionError, match="copied, not trained"):  # another recipe name is trained
        build_pointing_backbone(tmp_path / "artifacts" / "other-name", **recipe)
    with pytest.raises(AssertionError, match="copied, not trained"):  # so is a recipe the name does not record
        build_pointing_backbone(tmp_path / "changed" / "recipe-name", **{**recipe, "lr": 1e-4})
    with pytest.raises(AssertionError, match="copied, not trained"):  # the CLI regenerates: it always trains
        pointing.main([str(tmp_path / "regenerated" / "recipe-name"), "--steps", "2", "--threads", "1"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_shipped_checkpoint_points_at_objects_it_has_never_seen(family):
    """Regression check of the shipped artefacts: each family's language model answers 'point to the <object>' in
    its own format on fresh scenes (a seed stream no build used) about as well as its build recorded on its
    held-out scenes (0.046 for PaliGemma)."""

    from affordvla.formats.codecs import make_codec
    from affordvla.offline.tabletop import make_scenes
    from affordvla.pretraining.pointing import NATIVE_CODECS, RECORD_FILE, SHIPPED_DIR, _pixels, object_centres

    (shipped,) = [path for path in SHIPPED_DIR.iterdir() if path.name.startswith(f"{family}-tiny-")]
    recorded = json.loads((shipped / RECORD_FILE).read_text())["text_error"]
    backbone = FAMILIES[family].from_pretrained(shipped).eval()
    if family == "paligemma":
        backbone.prefix_lm = False  # as the text stage trained it and paligemma_tiny.yaml fine-tunes it
    scenes = list(make_scenes(seed=424_242, count=48, size=128))
    asked = [min(object_centres(scene).items()) for scene in scenes]  # each scene's first object by name
    codec = make_codec(NATIVE_CODECS[family], point_names=("point",))
    longest = max(len(backbone.tokenizer(codec.encode(centre[None]), add_special_tokens=False)["input_ids"])
                  for _, centre in asked)
    answers = backbone.generate(_pixels(backbone, scenes), [f"point to the {name}" for name, _ in asked],
                                max_new_tokens=longest + 2)
    errors = [np.linalg.norm(codec.decode(answer)[0] - centre) for answer, (_, centre) in zip(answers, asked)]
    assert recorded < 0.1, recorded
    assert_learned(f"shipped/{family}/text_pointing_error", float(np.mean(errors)), 0.1, errors)
