"""Action heads: normalisation, losses, step-wise inference against the batched forward, learning on a fixed
batch, action tokens, LLARVA text actions, and training + export through the real configs."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import assert_learned, compose_train, fell_by

from affordvla.backbones.factory import load_backbone
from affordvla.data.action_datamodule import (
    ActionWindowDataModule,
    collate_action_windows,
)
from affordvla.heads.action_normalization import ActionNormalizer
from affordvla.heads.language_actions import (
    ActionTokenizer,
    DiscreteActionHead,
    TextActionHead,
)
from affordvla.heads.policy_heads import HEADS, policy_loss
from affordvla.offline.toy_actions import generate_toy_calvin, scripted_action
from affordvla.policies import load_policy
from affordvla.policies.actions import (
    ActionPolicyModuleBase,
    ActionSession,
    ContinuousActionModule,
    LanguageActionModule,
)

TOY = {"train_episodes": 4, "val_episodes": 2, "episode_length": 12, "distractors": 1, "seed": 0}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from affordvla.data.generated import generated_name

    return tmp_path_factory.mktemp("toy_actions") / generated_name("calvin", TOY)


def _datamodule(root, window: int, chunk: int = 3) -> ActionWindowDataModule:
    dm = ActionWindowDataModule("calvin", str(root), window_size=window, chunk_size=chunk, batch_size=4,
                                cameras=("rgb_static",), generate=functools.partial(generate_toy_calvin, **TOY))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _module(backbone_dir, dm, head, **kwargs) -> ActionPolicyModuleBase:
    torch.manual_seed(0)
    backbone = load_backbone("paligemma", str(backbone_dir), prefix_lm=False)
    kind = LanguageActionModule if isinstance(head, (DiscreteActionHead, TextActionHead)) else ContinuousActionModule
    module = kind(backbone, head, optimizer=functools.partial(torch.optim.AdamW, lr=2e-3),
                  normalization={"mode": "bounds"}, **kwargs)
    module.configure_from_metadata(dm.metadata())
    return module


def _observation(frame, instruction: str) -> dict:
    return {"image": frame, "instruction": instruction}


def _batch(dm, indices=(0, 12, 24, 36)):  # the first frames of four episodes: far apart on the table
    return collate_action_windows([dm.splits["train"][i] for i in indices])


# --- normalisation -------------------------------------------------------------------------------------------


def test_clip_normalisation_and_exact_inverse():
    norm = ActionNormalizer(3, mode="clip", clip_bound=0.5)
    actions = torch.tensor([[0.25, -0.5, 1.0], [0.9, 0.1, -1.0]])
    arm = norm.normalize_arm(actions)
    assert torch.allclose(arm, torch.tensor([[0.5, -1.0], [1.0, 0.2]]))  # 0.9 clipped to 0.5 -> 1
    assert norm.gripper_target(actions).tolist() == [1.0, 0.0]
    back = norm.denormalize(arm, norm.gripper_target(actions) > 0.5)
    assert torch.allclose(back, torch.tensor([[0.25, -0.5, 1.0], [0.5, 0.1, -1.0]]))


def test_bounds_normalisation_by_hand():
    norm = ActionNormalizer(4, mode="bounds", q01=[-2.0, 0.0, 3.0, 0.0], q99=[2.0, 10.0, 3.0, 1.0], gripper_low=0.0)
    actions = torch.tensor([[1.0, 2.5, 3.0, 1.0], [-3.0, 10.0, 3.0, 0.0]])
    arm = norm.normalize_arm(actions)
    # 2 (x - q01) / (q99 - q01) - 1, clipped; the constant dimension maps to 0
    assert torch.allclose(arm, torch.tensor([[0.5, -0.5, 0.0], [-1.0, 1.0, 0.0]]), atol=1e-6)
    back = norm.denormalize(arm, norm.gripper_target(actions) > 0.5)
    assert torch.allclose(back, torch.tensor([[1.0, 2.5, 3.0, 1.0], [-2.0, 10.0, 3.0, 0.0]]), atol=1e-5)
    assert ActionNormalizer.from_dict(json.loads(json.dumps(norm.to_dict()))).to_dict() == norm.to_dict()


def test_normaliser_reads_the_gripper_convention_from_statistics():
    stats = {"q01": [-1, -1], "q99": [1, 1], "min": [-1, 0.0], "max": [1, 1]}
    assert ActionNormalizer.from_metadata({"action_dim": 2, "action_statistics": stats}, "bounds").gripper_low == 0.0
    stats["min"][-1] = -1.0
    assert ActionNormalizer.from_metadata({"action_dim": 2, "action_statistics": stats}, "bounds").gripper_low == -1.0
    with pytest.raises(ValueError, match="q01 and q99"):
        ActionNormalizer(3, mode="bounds")


def test_policy_loss_by_hand():
    norm = ActionNormalizer(2, mode="clip", clip_bound=1.0)
    arm = torch.tensor([[[0.5], [0.0]]])  # (1, 2, 1): one frame, chunk 2, one arm dimension
    logits = torch.tensor([[0.0, 0.0]])
    actions = torch.tensor([[[0.0, 1.0], [3.0, -1.0]]])  # the second step lies past the episode end
    mask = torch.tensor([[True, False]])
    out = policy_loss(arm, logits, actions, mask, norm, gripper_weight=0.5)
    assert out["arm_loss"].item() == pytest.approx(0.5 * 0.5**2)  # Huber below delta: x^2 / 2
    assert out["gripper_loss"].item() == pytest.approx(np.log(2))  # BCE of logit 0
    assert out["loss"].item() == pytest.approx(0.125 + 0.5 * np.log(2))


# --- the toy dataset -----------------------------------------------------------------------------------------


def test_toy_dataset_is_a_calvin_split_with_scripted_actions(toy_root):
    dm = _datamodule(toy_root, window=2)
    meta = dm.metadata()
    assert meta["action_dim"] == 7 and meta["cameras"] == {"rgb_static": [200, 200, 3]}
    sample = dm.splits["train"][0]
    assert sample.instruction.startswith("pick up the ") and sample.instruction.endswith(" block")
    first = sample.actions[0, 0]
    assert np.abs(first[:2]).max() <= 1 and first[6] in (-1.0, 1.0) and not first[3:6].any()
    # the expert: proportional reach (offset / 0.5, saturating at +-1), close on arrival, then lift
    target = np.array([0.5, 0.5])
    assert scripted_action(np.array([0.1, 0.45]), 0.3, False, target) == pytest.approx([0.8, 0.1, 0, 0, 0, 0, 1])
    assert scripted_action(np.array([0.95, 0.5]), 0.3, False, target) == pytest.approx([-0.9, 0, 0, 0, 0, 0, 1])
    assert scripted_action(np.array([0.0, 1.0]), 0.3, False, target).tolist() == [1, -1, 0, 0, 0, 0, 1]  # saturated
    assert scripted_action(np.array([0.49, 0.5]), 0.3, False, target).tolist() == [0, 0, 0, 0, 0, 0, -1]
    assert scripted_action(np.array([0.49, 0.5]), 0.35, True, target).tolist() == [0, 0, 1, 0, 0, 0, -1]


# --- step-wise inference = batched forward -------------------------------------------------------------------


@pytest.mark.parametrize("name,formulation", [("mlp", "policy_head"), ("lstm", "policy_head"),
                                              ("gpt", "policy_head"), ("mlp", "interleaved"),
                                              ("lstm", "interleaved")])
def test_stepwise_inference_equals_the_batched_forward(name, formulation, toy_root, tiny_backbone_dir):
    dm = _datamodule(toy_root, window=3)
    module = _module(tiny_backbone_dir, dm, functools.partial(HEADS[name], hidden_size=32), formulation=formulation)
    module.eval()
    sample = dm.splits["train"][2]
    with torch.no_grad():
        arm, gripper = module.continuous_outputs(collate_action_windows([sample]))
    batched = module.normalizer.denormalize(arm[0], gripper[0] > 0).numpy()  # (T, n, D)
    session = ActionSession(module)
    for t in range(3):
        chunk = session.act(_observation(sample.images["rgb_static"][t], sample.instruction)).actions
        np.testing.assert_allclose(chunk, batched[t], atol=2e-5)
    session.reset()  # a new episode starts from an empty history
    np.testing.assert_allclose(session.act(_observation(sample.images["rgb_static"][0], sample.instruction)).actions,
                               batched[0], atol=2e-5)


def test_lstm_keeps_a_window_of_history_beyond_the_window(toy_root, tiny_backbone_dir):
    """Past the window, the LSTM re-runs the last `window_size` frames: frame t's chunk equals the batched
    forward over frames t-W+1..t."""
    dm = _datamodule(toy_root, window=2)
    module = _module(tiny_backbone_dir, dm, functools.partial(HEADS["lstm"], hidden_size=32))
    module.eval()
    frames = np.concatenate([dm.splits["train"][0].images["rgb_static"], dm.splits["train"][2].images["rgb_static"]])
    instruction = dm.splits["train"][0].instruction
    session = ActionSession(module)
    chunks = [session.act(_observation(f, instruction)).actions for f in frames[:3]]
    window = {"images": {"rgb_static": torch.from_numpy(frames[1:3][None])}, "instructions": [instruction]}
    with torch.no_grad():
        arm, gripper = module.continuous_outputs(window)
    expected = module.normalizer.denormalize(arm[0, -1], gripper[0, -1] > 0).numpy()
    np.testing.assert_allclose(chunks[2], expected, atol=2e-5)


def test_ensemble_execution_averages_overlapping_chunks(toy_root, tiny_backbone_dir):
    dm = _datamodule(toy_root, window=2)
    module = _module(tiny_backbone_dir, dm, functools.partial(HEADS["mlp"], hidden_size=32))
    sample = dm.splits["train"][0]
    observations = [{"image": f, "instruction": sample.instruction} for f in sample.images["rgb_static"]]
    chunks = [step.actions for step in map(ActionSession(module, "first").act, observations)]
    np.testing.assert_allclose(ActionSession(module, "first").act(observations[0]).executed, chunks[0][0], atol=1e-6)
    ensemble = ActionSession(module, "ensemble", ensemble_decay=0.5)
    ensemble.act(observations[0])
    action = ensemble.act(observations[1]).executed
    weights = np.exp(-0.5 * np.arange(2))  # the older chunk first
    expected = (weights[0] * chunks[0][1] + weights[1] * chunks[1][0]) / weights.sum()
    np.testing.assert_allclose(action[:-1], expected[:-1], atol=1e-5)
    assert action[-1] in (-1.0, 1.0)


def test_export_round_trip_gives_identical_actions(toy_root, tiny_backbone_dir, tmp_path):
    dm = _datamodule(toy_root, window=2)
    factory = functools.partial(HEADS["gpt"], hidden_size=32)
    module = _module(tiny_backbone_dir, dm, factory)
    with torch.no_grad():
        module.action_token.normal_()  # not the zero init, so a lost token would show
    module.export(tmp_path)
    reloaded = load_policy(tmp_path).module
    assert reloaded.normalizer.to_dict() == module.normalizer.to_dict()
    batch = _batch(dm)
    module.eval(), reloaded.eval()
    with torch.no_grad():
        for a, b in zip(module.continuous_outputs(batch), reloaded.continuous_outputs(batch)):
            assert torch.equal(a, b)


# --- learning ------------------------------------------------------------------------------------------------


def _assert_loss_falls_20x(name: str, module: ActionPolicyModuleBase, batch, steps: int) -> None:
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(steps):
        loss = module.compute_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert_learned(f"overfit/{name}", fell_by(losses, window=10), 1 / 20, [round(v, 4) for v in losses[::10]])


@pytest.mark.parametrize("name", ["mlp", "lstm", "gpt"])
def test_continuous_heads_overfit_a_fixed_batch(name, toy_root, tiny_backbone_dir):
    dm = _datamodule(toy_root, window=2)
    module = _module(tiny_backbone_dir, dm, functools.partial(HEADS[name], hidden_size=64))
    batch = _batch(dm)
    _assert_loss_falls_20x(name, module, batch, steps=150)


@pytest.mark.parametrize("kind", ["discrete", "text_actions"])
def test_language_heads_overfit_a_fixed_batch(kind, toy_root, tiny_backbone_dir):
    dm = _datamodule(toy_root, window=1)
    head = DiscreteActionHead(bins=256) if kind == "discrete" else TextActionHead(history_steps=1, state_dims=3)
    module = _module(tiny_backbone_dir, dm, head)
    batch = _batch(dm)
    _assert_loss_falls_20x(kind, module, batch, steps=150)
    predicted, target, mask = module.predict_first_actions(batch)
    assert predicted.shape == target.shape == (4, 7) and mask.all()
    assert getattr(head, "n_failed", 0) == 0  # every greedy answer parsed
    # mostly memorised (a tiny model may still miss a digit of one sample)
    assert_learned(f"overfit/{kind}/action_error", np.abs(predicted - target).mean(), 0.1, (predicted, target))
    if kind == "discrete":  # the mean bin centre of a confident model is its argmax bin's, within a bin or two
        head.decoding = "expectation"
        expected, _, _ = module.predict_first_actions(batch)
        assert np.abs(expected - predicted)[:, :-1].max() < 0.05 and (expected[:, -1] == predicted[:, -1]).all()


# --- action tokens -------------------------------------------------------------------------------------------


def test_action_tokens_are_an_explicit_range_after_every_token(toy_root, tiny_backbone_dir):
    dm = _datamodule(toy_root, window=1)
    backbone = load_backbone("paligemma", str(tiny_backbone_dir), prefix_lm=False)
    vocab_before = dict(backbone.tokenizer.get_vocab())
    specials_before = set(backbone.tokenizer.all_special_ids)
    head = DiscreteActionHead(bins=256)
    module = LanguageActionModule(backbone, head, optimizer=None, normalization={"mode": "bounds"})
    module.configure_from_metadata(dm.metadata())
    ids = head.action_tokens.ids.tolist()
    assert ids == list(range(len(vocab_before), len(vocab_before) + 256))
    assert not set(ids) & set(vocab_before.values()) and not set(ids) & specials_before
    assert backbone.model.get_input_embeddings().num_embeddings >= ids[-1] + 1
    # the answer text tokenises to exactly n x D ids, all inside the range
    chunk = dm.splits["train"][0].actions[0]
    answer_ids = backbone.tokenizer(head.target_text(chunk), add_special_tokens=False)["input_ids"]
    assert len(answer_ids) == 3 * 7 and set(answer_ids) <= set(ids)
    # binding again (an exported policy) keeps the same ids
    head.bind(backbone, module.normalizer, 3)
    assert head.action_tokens.ids.tolist() == ids


def test_action_tokenizer_bins_and_centres():
    tokens = ActionTokenizer(first_id=1000, bins=4)  # bins [-1,-.5) [-.5,0) [0,.5) [.5,1]
    values = torch.tensor([-1.0, -0.6, -0.1, 0.0, 0.49, 0.5, 1.0, 7.0])
    assert tokens.encode(values).tolist() == [1000, 1000, 1001, 1002, 1002, 1003, 1003, 1003]
    assert tokens.decode(torch.tensor([1000, 1001, 1002, 1003])).tolist() == [-0.75, -0.25, 0.25, 0.75]


# --- LLARVA text actions -------------------------------------------------------------------------------------


def _bound_text_head(**kwargs) -> TextActionHead:
    head = TextActionHead(**kwargs)
    head.normalizer = ActionNormalizer(3, mode="clip")
    return head


def test_text_action_prompt_and_answer_exactly():
    head = _bound_text_head(history_steps=5, state_dims=2, visual_trace=True, image_size=100)
    states = np.array([[0.1, 0.2, 9.0], [0.3, 0.4, 9.0]])
    assert head.prompt("pick up the red block", states) == (
        'You are a Franka robot using the joint control. The task is "pick up the red block", and the previous '
        "two (including current) steps are [[0.1, 0.2], [0.3, 0.4]]. Can you predict action of the next 1 step "
        "and the trajectories of the end effector?")
    answer = head.target_text(np.array([[0.123, -1.0, 1.0]]), trace=head.trace_from_states(np.array([[0.5, 0.25, 0]])))
    assert answer == "The next action step: [0.12, -1.0, 1.0]. The trajectory: [[50, 25]]"
    values, ok = head.parse(answer, previous_gripper=1.0)
    assert ok and values.tolist() == pytest.approx([0.12, -1.0, 1.0])


@pytest.mark.parametrize("text", [
    "", "The next action step:", "The next action step: [0.1, 0.2]", "The next action step: [0.1, 0.2, 0.3, 0.4]",
    "The next action step: [0.1, nan, 1]", "The next action step: [a, b, c]", "The next action step: (0.1, 0.2, 1)",
    "The next action step: [0.1, 0.2, 1", "The next action step: [0.1,, 1]", "The next action step: [inf, 0, 1]",
    "no numbers at all", "The next action step: [0.1 0.2 1]", "The next action step: [1e999, 0, 1]",
    "The next action step: []",
])
def test_text_action_parser_falls_back_and_counts(text):
    head = _bound_text_head()
    values, ok = head.parse(text, previous_gripper=-1.0)
    assert not ok and values.tolist() == [0.0, 0.0, -1.0] and head.n_failed == 1


@pytest.mark.parametrize("text,expected", [
    ("The next action step: [0.1, -0.2, 1.0]", [0.1, -0.2, 1.0]),
    ("blah The next action step: [ 0.1 ,-0.2,1 ] trailing", [0.1, -0.2, 1.0]),
    ("[0.5, 0.5, -1]. The trajectory: [[1, 2]]", [0.5, 0.5, -1.0]),
    ("[[0.1, 0.2, 1]]x", [0.1, 0.2, 1.0]),
])
def test_text_action_parser_reads_loose_answers(text, expected):
    values, ok = _bound_text_head().parse(text, previous_gripper=1.0)
    assert ok and values.tolist() == pytest.approx(expected)


# --- training through the real configs -----------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["toy_actions_lstm", "toy_actions_discrete"])
def test_action_experiment_trains_and_exports(experiment, tmp_path, tiny_backbone_dir):
    from affordvla.train import train

    overrides = [f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"backbone.pretrained={tiny_backbone_dir}",
                 "backbone.build=null", "logger=none", "callbacks.progress_bar.refresh_rate=0",
                 "dataset.generate.train_episodes=2", "dataset.generate.val_episodes=1",
                 "dataset.generate.episode_length=8", "dataset.batch_size=4", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "head.hidden_size=16" if "lstm" in experiment else "head.bins=16"]
    cfg = compose_train(overrides, tmp_path / "run")
    metrics = train(cfg)
    for name in ("val/action_mse", "val/mean_baseline_mse", "val/gripper_accuracy", "test/action_mse"):
        assert np.isfinite(metrics[name]), name
    export = tmp_path / "run" / "model"
    config = json.loads((export / "policy.json").read_text())
    assert config["dataset_metadata"]["action_dim"] == 7 and config["head"]["normalizer"]["mode"] == "bounds"


def test_text_action_predict_keeps_the_previous_gripper_on_a_failed_parse():
    class FakeBackbone:  # generate() is all predict needs, plus a tokenizer to size the answer
        def tokenizer(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

        def generate(self, pixel_values, prompts, max_new_tokens):
            return ["The next action step: [0.5, -0.25, 1.0]", "I cannot tell"]

    head = _bound_text_head()
    texts, actions = head.predict(FakeBackbone(), torch.zeros(2, 3, 8, 8), ["a", "b"], previous_gripper=-1.0)
    assert texts[1] == "I cannot tell"
    assert actions.shape == (2, 1, 3)
    assert actions[0, 0].tolist() == [0.5, -0.25, 1.0] and actions[1, 0].tolist() == [0.0, 0.0, -1.0]
    assert (head.n_parsed, head.n_failed) == (1, 1)
