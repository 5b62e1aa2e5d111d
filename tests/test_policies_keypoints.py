"""The keypoint policy kind: a module trained a few steps on the smoke KALIE data, exported, and loaded in a fresh
state through load_policy predicts exactly what the trained module predicts, batched and step by step; exports
written before policy.json (version 0) load; a format this version cannot read is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from safetensors.torch import save_file

from affordvla.data.kalie_augment import centre_crop
from affordvla.evaluate import keypoint_settings
from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KALIE_POINT_NAMES, KeypointSample
from affordvla.offline.tabletop import make_scenes
from affordvla.policies.base import (
    POLICY_FILE,
    KeypointPrediction,
    Observation,
    PolicyFormatError,
)
from affordvla.policies.keypoints import KeypointPolicy, KeypointPolicyModule
from affordvla.policies.loading import load_policy

HEADS = {"text": [], "regression": ["head=keypoint_regression", "module=keypoint_regression",
                                    "head.mlp_hidden_size=32"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_dir) -> dict[str, KeypointPolicyModule]:
    """Each head's module, built from the real configs and trained 4 steps (validated at 2 and 4) on the smoke
    toy KALIE data, as affordvla-train would."""
    modules = {}
    for name, extra in HEADS.items():
        root = tmp_path_factory.mktemp(f"kp_{name}")
        cfg = compose_train(["debug=smoke", f"paths.root_dir={root}", f"backbone.pretrained={tiny_backbone_dir}",
                             "backbone.build=null", "dataset.generate.image_size=64", *extra], root / "run")
        L.seed_everything(0)
        datamodule = instantiate(cfg.dataset)
        head = instantiate(cfg.head)
        module = instantiate(cfg.module, backbone=instantiate(cfg.backbone), head=head)
        trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=datamodule)
        assert "val/keypoint_error" in trainer.callback_metrics
        modules[name] = module.eval()
    return modules


def _observations(count: int = 3) -> list[dict]:
    return [{"image": s.image, "instruction": TASKS[s.task].instruction, "task": s.task}
            for s in make_scenes(11, count, 64)]


def _expected(module: KeypointPolicyModule, observations: list[dict], crop: float | None = None):
    """What the trained module's head answers for the observations, as evaluation feeds it (the crop applied
    to the image the way the datamodule crops), with the points mapped back to the full frame."""
    samples = [KeypointSample(image=o["image"], instruction=o["instruction"], task=o["task"],
                              keypoints=np.zeros((5, 2))) for o in observations]
    views = [centre_crop(s, crop) if crop else s for s in samples]
    pixels = module.backbone.preprocess_images([v.image for v in views])
    with torch.no_grad():
        texts, points = module.head.predict(module.backbone, pixels, views)
    if crop:
        size = observations[0]["image"].shape[0]
        left = (size - round(size * crop)) // 2
        points = [None if p is None else (np.asarray(p, np.float64) * round(size * crop) + left) / size
                  for p in points]
    return texts, points


def _check(predictions: list[KeypointPrediction], texts, points, writes_text: bool) -> None:
    assert len(predictions) == len(texts)
    for prediction, text, found in zip(predictions, texts, points):
        assert prediction.text == (text if writes_text else "")
        assert prediction.parsed == (found is not None)
        if found is None:
            assert prediction.points.shape == (0, 2)
            continue
        assert prediction.names == KALIE_POINT_NAMES
        assert prediction.points.dtype == np.float32
        np.testing.assert_array_equal(prediction.points, np.asarray(found).astype(np.float32))


@pytest.mark.parametrize("name", list(HEADS))
def test_an_export_predicts_what_the_trained_module_predicts(trained, name, tmp_path):
    module = trained[name]
    export = module.export(tmp_path / "export", source={"run_dir": "somewhere", "step": 4})
    record = json.loads((export / POLICY_FILE).read_text())
    assert record["kind"] == "keypoints" and record["format_version"] == 1
    assert record["head"]["class"] == type(module.head).__name__
    assert record["head"]["point_names"] == list(KALIE_POINT_NAMES) and record["head"]["centre_crop"] is None
    assert (export / "head.safetensors").is_file() == (name == "regression")  # the text head has no weights
    if name == "text":  # what affordvla-eval keypoints decodes with, as decoding.json recorded it before
        assert keypoint_settings(export) == {"codec": "paligemma_loc", "constrained": True, "max_new_tokens": None,
                                             "prompt_style": "instruction", "prefix_lm": False, "centre_crop": None}

    policy = load_policy(export)
    assert isinstance(policy, KeypointPolicy) and policy.module is not module
    assert policy.info()["head"] == type(module.head).__name__
    observations = _observations()
    texts, points = _expected(module, observations)
    predictions = policy.predict(observations)
    _check(predictions, texts, points, writes_text=name == "text")
    # the session keeps no history: each act is the prediction of that observation alone (exactly; within float
    # tolerance of the batched one, whose matrix products a CPU may sum in another order)
    session = policy.session()
    session.reset()
    for observation, batched in zip(observations, predictions):
        acted = session.act(Observation.coerce(observation))
        (alone,) = policy.predict([observation])
        assert acted.text == alone.text and acted.parsed == alone.parsed and acted.names == alone.names
        np.testing.assert_array_equal(acted.points, alone.points)
        if acted.parsed and batched.parsed:
            np.testing.assert_allclose(acted.points, batched.points, atol=1e-5)


def test_the_recorded_centre_crop_is_applied_and_points_come_back_in_the_full_frame(trained, tmp_path):
    module = trained["regression"]
    module.centre_crop = 0.5  # as a run on KALIE's cropped evaluation view records it
    try:
        export = module.export(tmp_path / "export")
    finally:
        module.centre_crop = None
    policy = load_policy(export)
    observations = _observations(2)
    texts, points = _expected(module, observations, crop=0.5)
    _check(policy.predict(observations), texts, points, writes_text=False)
    # an evaluation whose data crops the images already asks for no second crop
    cropped = [{**o, "image": centre_crop(KeypointSample(o["image"], "", np.zeros((5, 2))), 0.5).image}
               for o in observations]
    texts, points = _expected(module, cropped)
    _check(policy.predict(cropped, centre_crop=False), texts, points, writes_text=False)


def _backbone_only(module: KeypointPolicyModule, folder: Path) -> Path:
    """The backbone as every export writes it, without any policy record."""
    module.export(folder)
    for name in (POLICY_FILE, "head.safetensors"):
        (folder / name).unlink(missing_ok=True)
    return folder


def test_version_0_exports_load(trained, tmp_path):
    observations = _observations(2)
    # keypoint text: decoding.json beside the backbone, as affordvla-train wrote it before policy.json
    text = trained["text"]
    folder = _backbone_only(text, tmp_path / "text")
    (folder / "decoding.json").write_text(json.dumps(
        {"codec": "paligemma_loc", "constrained": True, "max_new_tokens": None, "prompt_style": "instruction",
         "prefix_lm": False, "centre_crop": None}, indent=2, sort_keys=True))
    policy = load_policy(folder)
    assert policy.record["format_version"] == 0
    assert policy.decoding == {"codec": "paligemma_loc", "constrained": True, "max_new_tokens": None,
                               "prompt_style": "instruction", "prefix_lm": False, "centre_crop": None}
    _check(policy.predict(observations), *_expected(text, observations), writes_text=True)
    # its decoding can be overridden at load (affordvla-eval keypoints --no-constrained ...)
    from affordvla.policies import keypoints

    loose = keypoints.load(folder, {"kind": "keypoints", "format_version": 0}, overrides={"constrained": False})
    assert loose.decoding["constrained"] is False and loose.module.head.constrained is False

    # keypoint regression: keypoint_head.json and keypoint_head.safetensors (its state_dict) beside the backbone
    regression = trained["regression"]
    folder = _backbone_only(regression, tmp_path / "regression")
    (folder / "keypoint_head.json").write_text(json.dumps(
        {"num_points": 5, "mlp_hidden_size": 32, "loss": "l1", "prompt_style": "instruction"}, indent=2))
    save_file({k: v.contiguous() for k, v in regression.head.state_dict().items()},
              str(folder / "keypoint_head.safetensors"))
    policy = load_policy(folder)
    _check(policy.predict(observations), *_expected(regression, observations), writes_text=False)
    with pytest.raises(ValueError, match=r"KeypointRegressionHead writes no text: \['codec'\]"):
        keypoints.load(folder, {"kind": "keypoints", "format_version": 0}, overrides={"codec": "robopoint"})


def test_a_newer_format_and_an_unknown_head_are_refused(trained, tmp_path):
    export = trained["text"].export(tmp_path / "export")
    record = json.loads((export / POLICY_FILE).read_text())
    (export / POLICY_FILE).write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(PolicyFormatError, match="format_version 99"):
        load_policy(export)
    record["head"]["class"] = "os.system"
    (export / POLICY_FILE).write_text(json.dumps(record))
    with pytest.raises(PolicyFormatError, match=r"head class 'os.system' is not a keypoint head"):
        load_policy(export)


def test_weights_that_do_not_fit_the_recorded_head_are_named(trained, tmp_path):
    export = trained["regression"].export(tmp_path / "export")
    record = json.loads((export / POLICY_FILE).read_text())
    record["head"]["settings"]["num_points"] = 3
    (export / POLICY_FILE).write_text(json.dumps(record))
    with pytest.raises(PolicyFormatError, match="head.safetensors"):
        load_policy(export)
    shutil.rmtree(export)
