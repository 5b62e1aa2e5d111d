"""Action policies through the policy contract: every head trains a few steps, exports (policy.json format 1 and
head.safetensors), and loads back with `load_policy` into a policy whose batched `predict` and step-wise
`session()` give what the trained module gives. Version-0 exports (as affordvla wrote them before the format had
a version) still load; unknown versions, heads and pairings are refused with what was expected."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from affordvla.backbones.factory import load_backbone
from affordvla.backbones.finetuning import export_backbone
from affordvla.data.action_datamodule import ActionWindowDataModule, collate_action_windows
from affordvla.heads.language_actions import DiscreteActionHead, TextActionHead
from affordvla.heads.policy_heads import HEADS
from affordvla.policies import ActionPrediction, Observation, PolicyFormatError, load_policy
from affordvla.policies.actions import ActionPolicy, ContinuousActionModule, LanguageActionModule

TOY = {"train_episodes": 3, "val_episodes": 1, "episode_length": 8, "distractors": 1, "seed": 0}
WINDOW, CHUNK = 3, 2
# name -> (window of the data, head factory, module settings)
CASES = {
    "lstm": (WINDOW, lambda: functools.partial(HEADS["lstm"], hidden_size=16, num_layers=1), {}),
    "gpt": (WINDOW, lambda: functools.partial(HEADS["gpt"], hidden_size=16, num_heads=2), {}),
    "mlp": (WINDOW, lambda: functools.partial(HEADS["mlp"], hidden_size=16), {}),
    "interleaved": (WINDOW, lambda: functools.partial(HEADS["mlp"], hidden_size=16), {"formulation": "interleaved"}),
    "discrete": (1, lambda: DiscreteActionHead(bins=16), {}),
    "text_actions": (WINDOW, lambda: TextActionHead(history_steps=2, state_dims=3, decimals=1), {}),
}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from affordvla.data.generated import generated_name

    return tmp_path_factory.mktemp("toy_actions") / generated_name("calvin", TOY)


def _datamodule(root, window: int) -> ActionWindowDataModule:
    dm = ActionWindowDataModule("calvin", str(root), window_size=window, chunk_size=CHUNK, batch_size=4,
                                cameras=("rgb_static",), generate=TOY)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _trained(name: str, root, backbone_dir, steps: int = 3):
    """A module of head `name` after a few optimiser steps on the toy windows, in eval mode, and its data."""
    window, head, settings = CASES[name]
    dm = _datamodule(root, window)
    torch.manual_seed(0)
    backbone = load_backbone("paligemma", str(backbone_dir), prefix_lm=False)
    kind = LanguageActionModule if name in ("discrete", "text_actions") else ContinuousActionModule
    module = kind(backbone, head(), optimizer=functools.partial(torch.optim.AdamW, lr=2e-3),
                  normalization={"mode": "bounds"}, **settings)
    module.configure_from_metadata(dm.metadata())
    optimizer = module.configure_optimizers()
    batch = collate_action_windows([dm.splits["train"][i] for i in (0, 5, 10, 15)])
    for _ in range(steps):
        loss = module.compute_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval(), dm


def _observations(sample) -> list[dict]:
    """The frames of a window as a session sees them: the camera's image, the instruction, the proprio state."""
    return [{"images": {"rgb_static": frame}, "instruction": sample.instruction, "state": state}
            for frame, state in zip(sample.images["rgb_static"], sample.state)]


def policy_observation(observation: dict) -> Observation:
    return Observation.coerce(observation)


def _window_chunks(module, sample) -> list[np.ndarray]:
    """The batched training forward over one window: each frame's chunk (n, D) in dataset units."""
    batch = collate_action_windows([sample])
    with torch.no_grad():
        if isinstance(module, ContinuousActionModule):
            arm, gripper = module.continuous_outputs(batch)
            return list(module.normalizer.denormalize(arm[0], gripper[0] > 0).numpy())
        frames, prompts, _, _, _ = module._samples(batch, with_answers=False)
        return list(module.language_head.predict(module.backbone, module.pixel_values(frames), prompts)[1])


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_into_a_policy_that_predicts_as_the_trained_module(name, toy_root, tiny_backbone_dir,
                                                                         tmp_path):
    module, dm = _trained(name, toy_root, tiny_backbone_dir)
    if isinstance(module, ContinuousActionModule):
        with torch.no_grad():
            module.action_token.normal_()  # not the zero init, so a lost token would show
    module.export(tmp_path / "export", source={"run": "test"})
    record = json.loads((tmp_path / "export" / "policy.json").read_text())
    assert record["kind"] == "actions" and record["format_version"] == 1
    assert record["head"]["class"] == ("mlp" if name == "interleaved" else name)
    assert record["source"] == {"run": "test"}
    assert (tmp_path / "export" / "head.safetensors").is_file() == isinstance(module, ContinuousActionModule)

    policy = load_policy(tmp_path / "export")
    assert isinstance(policy, ActionPolicy) and type(policy.module) is type(module) and not policy.module.training
    assert policy.module.normalizer.to_dict() == module.normalizer.to_dict() and policy.camera == "rgb_static"
    assert policy.info()["action_dim"] == 7 and policy.info()["head"] == record["head"]["class"]

    # (a) batched, stateless predict = the trained module's own prediction on the same observations
    observations = [o for i in (0, 4) for o in _observations(dm.splits["val"][i])[:2]]
    expected = module.predict_observations([policy_observation(o) for o in observations])
    predicted = policy.predict(observations)
    assert len(predicted) == len(observations) and all(isinstance(p, ActionPrediction) for p in predicted)
    for got, want in zip(predicted, expected):
        assert got.actions.shape == (1 if name == "text_actions" else CHUNK, 7)  # LLARVA answers one step
        np.testing.assert_allclose(got.actions, want.actions, atol=1e-5)
        assert (got.text, got.parsed) == (want.text, want.parsed)

    # (b) a session over a window = the trained module's batched forward over that window
    sample = dm.splits["val"][0]
    batched = _window_chunks(module, sample)
    session = policy.session()
    for _ in range(2):  # reset() starts a new episode from an empty history
        session.reset()
        for t, observation in enumerate(_observations(sample)[: len(batched)]):
            step = session.act(observation)
            np.testing.assert_allclose(step.actions, batched[t], atol=2e-5)
            np.testing.assert_allclose(step.executed, batched[t][0], atol=2e-5)  # execution "first"


def test_a_version_0_export_loads_from_its_policy_json_or_the_run_config_beside_it(toy_root, tiny_backbone_dir,
                                                                                 tmp_path):
    """The layout export_policy wrote before format 1: policy.json without kind or version (the head's Hydra config
    and prefix_lm when affordvla-train wrote it) and policy_head.safetensors; earlier still, no head config, and
    the run's config_resolved.yaml beside the export folder."""
    module, dm = _trained("mlp", toy_root, tiny_backbone_dir)
    export = tmp_path / "run" / "model"
    export_backbone(module.backbone, export)
    head_config = {"_target_": "affordvla.heads.policy_heads.MLPHead", "_partial_": True, "hidden_size": 16,
                   "num_layers": 2}
    old = {"formulation": "policy_head", "latent_tokens": 1, "camera": "rgb_static",
           "normalizer": module.normalizer.to_dict(), "dataset_metadata": dm.metadata()}
    (export / "policy.json").write_text(json.dumps({**old, "head": head_config, "prefix_lm": False}, indent=2))
    weights = {f"head.{k}": v.contiguous() for k, v in module.policy_head.state_dict().items()}
    save_file({**weights, "action_token": module.action_token.detach().contiguous()},
              str(export / "policy_head.safetensors"))
    observations = _observations(dm.splits["val"][0])[:2]
    expected = [p.actions for p in module.predict_observations([policy_observation(o) for o in observations])]

    policy = load_policy(export)
    assert policy.record["format_version"] == 0 and policy.record["head"]["class"] == "mlp"
    for got, want in zip(policy.predict(observations), expected):
        np.testing.assert_allclose(got.actions, want, atol=1e-5)

    (export / "policy.json").write_text(json.dumps(old, indent=2))  # the older form: the head in the run config
    with pytest.raises(FileNotFoundError, match="config_resolved.yaml"):
        load_policy(export)
    (tmp_path / "run" / "config_resolved.yaml").write_text(
        "head:\n  _target_: affordvla.heads.policy_heads.MLPHead\n  _partial_: true\n  hidden_size: 16\n"
        "  num_layers: 2\nbackbone:\n  family: paligemma\n  prefix_lm: false\n")
    for got, want in zip(load_policy(export).predict(observations), expected):
        np.testing.assert_allclose(got.actions, want, atol=1e-5)

    # a version-0 head is looked up by its class path, never imported
    head_config["_target_"] = "os.system"
    (export / "policy.json").write_text(json.dumps({**old, "head": head_config}))
    with pytest.raises(PolicyFormatError, match="'os.system' is not an action head"):
        load_policy(export)


def test_unknown_versions_and_heads_are_refused(toy_root, tiny_backbone_dir, tmp_path):
    module, _ = _trained("mlp", toy_root, tiny_backbone_dir, steps=0)
    module.export(tmp_path)
    record = json.loads((tmp_path / "policy.json").read_text())
    (tmp_path / "policy.json").write_text(json.dumps(record | {"format_version": 99}))
    with pytest.raises(PolicyFormatError, match="format_version 99"):
        load_policy(tmp_path)
    record["head"]["class"] = "transformers.AutoModel"
    (tmp_path / "policy.json").write_text(json.dumps(record))
    with pytest.raises(PolicyFormatError, match="'transformers.AutoModel' is not an action head"):
        load_policy(tmp_path)
    with pytest.raises(ValueError, match="unknown execution 'last'"):
        ActionPolicy(module, record).session(execution="last")


def test_a_head_paired_with_the_wrong_module_names_the_module_to_use(tiny_backbone_dir):
    backbone = load_backbone("paligemma", str(tiny_backbone_dir), prefix_lm=False)
    with pytest.raises(ValueError, match="use module=language_actions"):
        ContinuousActionModule(backbone, DiscreteActionHead())
    with pytest.raises(ValueError, match="use module=action_policy"):
        LanguageActionModule(backbone, functools.partial(HEADS["lstm"], hidden_size=16))
    with pytest.raises(ValueError, match="unknown module.formulation 'sideways'"):
        ContinuousActionModule(backbone, functools.partial(HEADS["lstm"]), formulation="sideways")


def test_the_head_record_holds_every_constructor_setting(toy_root, tiny_backbone_dir):
    """Defaults are written out, so a later change of a default does not change what an export rebuilds."""
    module, _ = _trained("text_actions", toy_root, tiny_backbone_dir, steps=0)
    assert module.head_record()["settings"] == {
        "decimals": 1, "history_steps": 2, "state_dims": 3, "visual_trace": False, "trace_state_dims": [0, 1],
        "image_size": 224, "robot": "a Franka robot using the joint control"}
    module, _ = _trained("gpt", toy_root, tiny_backbone_dir, steps=0)
    record = module.head_record()
    assert record["settings"] == {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
    assert (record["formulation"], record["latent_tokens"], record["camera"]) == ("policy_head", 1, "rgb_static")
