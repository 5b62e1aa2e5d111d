"""The keypoint regression head: it learns a fixed batch, works on every backbone family, and its export
round-trips exactly."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from conftest import assert_learned, fell_by

from affordvla.backbones.factory import load_backbone
from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KeypointSample
from affordvla.heads.keypoint_regression import KeypointRegressionHead
from affordvla.offline.tabletop import make_scenes
from affordvla.policies.base import PolicyFormatError, read_head_state
from affordvla.policies.keypoints import KeypointPolicyModule

TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "vision_layers": 1, "text_layers": 1,
        "intermediate_size": 128}


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory):
    """One freshly initialised tiny checkpoint per family (32 px, one layer each side)."""
    from affordvla.offline.tiny_cogvlm import write_tiny_cogvlm
    from affordvla.offline.tiny_llava import write_tiny_llava
    from affordvla.offline.tiny_paligemma import write_tiny_paligemma

    root = tmp_path_factory.mktemp("regression_backbones")
    builders = {"paligemma": write_tiny_paligemma, "llava": write_tiny_llava, "cogvlm": write_tiny_cogvlm}
    return {family: str(build(root / family, seed=0, **TINY)) for family, build in builders.items()}


def _samples(count: int = 4) -> list[KeypointSample]:
    return [KeypointSample(image=s.image, instruction=TASKS[s.task].instruction, keypoints=s.keypoints, task=s.task,
                           meta={"source": "scenes", "entry": f"entry_{i}"})
            for i, s in enumerate(make_scenes(5, count, 32))]


def _module(path: str, family: str) -> KeypointPolicyModule:
    torch.manual_seed(0)
    backbone = load_backbone(family, path)
    return KeypointPolicyModule(backbone, KeypointRegressionHead(mlp_hidden_size=32),
                                optimizer=partial(torch.optim.AdamW, lr=3e-3), scheduler=None)


def _predict_batch(module: KeypointPolicyModule, batch) -> torch.Tensor:
    return module.head(module.backbone, batch["pixel_values"], batch["prompts"])


def test_regression_learns_a_fixed_batch(tiny_backbones):
    module = _module(tiny_backbones["paligemma"], "paligemma")
    batch = module.make_collate()(_samples())
    optimizer = module.configure_optimizers()
    assert any(g["name"] == "keypoint_head" for g in optimizer.param_groups)
    losses = []
    module.backbone.train()
    for _ in range(60):
        loss = module.head.loss(_predict_batch(module, batch), batch["targets"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert_learned("overfit/keypoint_regression", fell_by(losses), 0.3, losses[::10])
    predicted = _predict_batch(module, batch).detach()
    assert predicted.shape == (4, 5, 2) and predicted.min() >= 0 and predicted.max() <= 1


@pytest.mark.parametrize("family", ["paligemma", "llava", "cogvlm"])
def test_every_backbone_family_feeds_the_readout(tiny_backbones, family):
    module = _module(tiny_backbones[family], family)
    batch = module.make_collate()(_samples(2))
    predicted = _predict_batch(module, batch)
    assert predicted.shape == (2, 5, 2)
    module.head.loss(predicted, batch["targets"])["loss"].backward()
    assert module.head.readout.grad is not None and module.head.readout.grad.abs().sum() > 0
    # scored like the text head: the same evaluator and metric names, and nothing fails to parse
    module.mean_keypoints = np.full((5, 2), 0.5, np.float32)
    module._start_eval("test")
    module.evaluators["test"].add(batch["samples"], ["-"] * 2, list(predicted.detach().numpy()))
    metrics = module.evaluators["test"].compute()
    assert metrics["parse_failure_rate"] == 0.0 and "kalie_corrected/avg_mse" in metrics and "keypoint_error" in metrics


def test_export_and_load_are_exact(tiny_backbones, tmp_path):
    trained = _module(tiny_backbones["paligemma"], "paligemma")
    with torch.no_grad():
        for parameter in trained.head.parameters():
            parameter.add_(torch.randn_like(parameter))  # weights no fresh head could have
    trained.export(tmp_path / "export")
    restored = _module(tiny_backbones["paligemma"], "paligemma")
    assert not torch.equal(restored.head.readout, trained.head.readout)
    restored.load_head_state(read_head_state(tmp_path / "export"))
    for (name, a), (_, b) in zip(trained.head.state_dict().items(), restored.head.state_dict().items()):
        assert torch.equal(a, b), name
    batch = trained.make_collate()(_samples(2))
    trained.eval(), restored.eval()
    assert torch.equal(_predict_batch(trained, batch), _predict_batch(restored, batch))
    # the module's checkpoint state (what Lightning saves) carries the head too
    state = trained.state_dict()
    assert any(k.startswith("head.mlp.") for k in state) and "head.readout" in state


def test_mismatched_head_settings_and_point_counts_are_named(tiny_backbones, tmp_path):
    module = _module(tiny_backbones["paligemma"], "paligemma")
    module.export(tmp_path / "export")
    other = KeypointPolicyModule(module.backbone, KeypointRegressionHead(num_points=3, mlp_hidden_size=32),
                                 optimizer=partial(torch.optim.AdamW, lr=1e-3))
    with pytest.raises(PolicyFormatError, match="do not fit this KeypointRegressionHead"):
        other.load_head_state(read_head_state(tmp_path / "export"))
    sample = _samples(1)[0]
    sample.keypoints = sample.keypoints[:2]
    with pytest.raises(ValueError, match="entry_0"):
        module.head.target([sample])
    # one module for both keypoint heads: what it refuses is a head that is not a keypoint head
    with pytest.raises(TypeError, match="needs a keypoint head"):
        KeypointPolicyModule(module.backbone, torch.nn.Linear(2, 2), optimizer=partial(torch.optim.AdamW, lr=1e-3))
