"""dataset=rlbench: RLBench demonstrations as action windows through the episode cache, with LLARVA's actions
(next step's joint velocities + gripper_open), statistics by hand, and a few training steps through the configs."""

import json
import pickle

import numpy as np
import pytest
from conftest import compose_train

from affordvla.data.action_datamodule import ActionWindowDataModule
from affordvla.data.rlbench import write_episode


def _observations(n, seed):
    rng = np.random.default_rng(seed)
    return [{"joint_positions": rng.uniform(-1, 1, 7), "joint_velocities": rng.uniform(-0.5, 0.5, 7),
             "gripper_open": 1.0 if i < n // 2 else 0.0, "front_rgb": None, "wrist_rgb": None} for i in range(n)]


def _write(folder, n, seed, **kwargs):
    observations = _observations(n, seed)
    images = {"front_rgb": [np.full((8, 8, 3), 10 * seed + i, np.uint8) for i in range(n)],
              "wrist_rgb": [np.full((6, 6, 3), 100 + 10 * seed + i, np.uint8) for i in range(n)]}
    write_episode(folder, observations, images=images, **kwargs)
    return observations


def _actions(observations):
    """LLARVA's action at step t: obs[t + 1].joint_velocities + obs[t + 1].gripper_open; the last frame has none."""
    return np.array([[*o["joint_velocities"], o["gripper_open"]] for o in observations[1:]], np.float32)


@pytest.fixture(scope="module")
def rlbench_root(tmp_path_factory):
    """{root}/{train,val}/{task}/: close_jar in the all_variations layout, open_drawer in the upstream one."""
    root = tmp_path_factory.mktemp("rlbench_data")
    episodes = {}
    episodes["close_jar/0"] = _write(root / "train" / "close_jar" / "all_variations" / "episodes" / "episode0", 5, 1,
                                     descriptions=["close the red jar"], variation_number=0)
    variation = root / "train" / "open_drawer" / "variation0"
    variation.mkdir(parents=True)
    with open(variation / "variation_descriptions.pkl", "wb") as f:
        pickle.dump(["open the top drawer", "grip the top handle"], f)
    episodes["open_drawer/0"] = _write(variation / "episodes" / "episode0", 6, 2)
    episodes["open_drawer/1"] = _write(variation / "episodes" / "episode1", 4, 3)
    val = root / "val" / "open_drawer" / "variation0"
    val.mkdir(parents=True)
    with open(val / "variation_descriptions.pkl", "wb") as f:
        pickle.dump(["open the bottom drawer"], f)
    episodes["val/open_drawer/0"] = _write(val / "episodes" / "episode0", 5, 4)
    return root, episodes


def test_windows_metadata_and_statistics(rlbench_root, tmp_path):
    root, episodes = rlbench_root
    dm = ActionWindowDataModule("rlbench", str(root), train_split="train", val_split="val", window_size=3,
                                chunk_size=2, cameras=("front", "wrist"), cache_dir=str(tmp_path / "cache"),
                                batch_size=4)
    dm.setup()
    train = dm.splits["train"]
    # tasks in name order, episodes by number; every step but the last frame of each demo is a window
    assert len(train) == 4 + 5 + 3 and len(dm.splits["val"]) == 4

    jar = _actions(episodes["close_jar/0"])
    first = train[0]  # close_jar, t=0: the history before the episode start repeats frame 0 and is masked
    assert first.instruction == "close the red jar"
    np.testing.assert_array_equal(first.frame_mask, [False, False, True])
    np.testing.assert_array_equal(first.images["front"][:, 0, 0, 0], [10, 10, 10])
    np.testing.assert_array_equal(first.images["wrist"][:, 0, 0, 0], [110, 110, 110])
    np.testing.assert_allclose(first.actions[2], jar[[0, 1]])
    np.testing.assert_allclose(first.state[2], episodes["close_jar/0"][0]["joint_positions"], atol=1e-6)
    assert first.actions.shape == (3, 2, 8)

    drawer = _actions(episodes["open_drawer/0"])
    last = train[4 + 4]  # open_drawer episode0, t=4 (its last step): the chunk runs past the end
    assert last.instruction == "open the top drawer"
    np.testing.assert_array_equal(last.images["front"][:, 0, 0, 0], [22, 23, 24])
    np.testing.assert_allclose(last.actions[:, 0], drawer[[2, 3, 4]])
    np.testing.assert_allclose(last.actions[2, 1], drawer[4])  # clamped to the last action ...
    np.testing.assert_array_equal(last.action_mask, [[True, True], [True, True], [True, False]])  # ... and masked
    assert set(np.unique(drawer[:, -1])) == {0.0, 1.0}  # gripper_open of the next step, as LLARVA

    meta = dm.metadata()
    assert meta["source"] == "rlbench" and meta["tasks"] == ["close_jar", "open_drawer"]
    assert meta["action_dim"] == 8 and meta["state_dim"] == 7 and meta["sizes"] == {"train": 12, "val": 4}
    assert meta["cameras"] == {"front": [8, 8, 3], "wrist": [6, 6, 3]}
    values = np.concatenate([_actions(episodes[k]) for k in ("close_jar/0", "open_drawer/0", "open_drawer/1")])
    values = values.astype(np.float64)
    stats = meta["action_statistics"]
    assert stats["count"] == 12
    for name, expected in {"mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0),
                           "q01": np.quantile(values, 0.01, axis=0), "q99": np.quantile(values, 0.99, axis=0)}.items():
        np.testing.assert_allclose(stats[name], expected, atol=1e-6, err_msg=name)
    json.dumps(meta)  # travels with checkpoints as JSON

    # one task, one camera: a cache of its own beside the first
    only = ActionWindowDataModule("rlbench", str(root), train_split="train", val_split="val", window_size=3,
                                  chunk_size=2, cameras=("front",), tasks=["open_drawer"],
                                  cache_dir=str(tmp_path / "cache"))
    only.setup()
    assert len(only.splits["train"]) == 8 and list(only.splits["train"][0].images) == ["front"]
    assert len(list((tmp_path / "cache").glob("rlbench_*_train.h5"))) == 2


def test_wrong_rlbench_configuration_is_explained(rlbench_root, tmp_path):
    root, _ = rlbench_root
    with pytest.raises(ValueError, match=r"RLBench cameras \['rgb_static'\] are not among"):
        ActionWindowDataModule("rlbench", str(root), cameras=("rgb_static",))
    with pytest.raises(ValueError, match="give `cache_dir`"):
        ActionWindowDataModule("rlbench", str(root), train_split="train", val_split="val", cameras=("front",)).setup()
    with pytest.raises(ValueError, match=r"tasks \['stack_blocks'\] have no folder in .*train"):
        ActionWindowDataModule("rlbench", str(root), train_split="train", cameras=("front",), tasks=["stack_blocks"],
                               cache_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="split folder .*validation does not exist"):
        ActionWindowDataModule("rlbench", str(root), train_split="train", val_split="validation",
                               cameras=("front",), cache_dir=str(tmp_path / "c2")).setup()


def test_rlbench_trains_through_the_action_experiment(rlbench_root, tmp_path, tiny_backbone_dir):
    from affordvla.train import train

    root, _ = rlbench_root
    overrides = ["experiment=toy_actions_lstm", "dataset=rlbench", f"dataset.root={root}",
                 f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.num_workers=0", "dataset.batch_size=4",
                 "dataset.window_size=2", "dataset.chunk_size=2", f"paths.root_dir={tmp_path}",
                 f"backbone.pretrained={tiny_backbone_dir}", "backbone.build=null", "logger=none",
                 "callbacks.progress_bar.refresh_rate=0", "trainer.max_steps=3", "trainer.val_check_interval=3",
                 "head.hidden_size=16"]
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.dataset.source == "rlbench"
    metrics = train(cfg)
    for name in ("val/action_mse", "val/mean_baseline_mse", "val/gripper_accuracy", "test/action_mse"):
        assert np.isfinite(metrics[name]), name
    config = json.loads((tmp_path / "run" / "model" / "policy.json").read_text())
    assert config["dataset_metadata"]["action_dim"] == 8 and config["dataset_metadata"]["cameras"] == {
        "front": [8, 8, 3]}
    assert config["head"]["normalizer"]["gripper_low"] == 0.0  # gripper_open is 1 / 0 in RLBench
