"""The episode datamodule reads CALVIN and OXE directly or through the HDF5 cache, and reports their shapes."""

import numpy as np
import pytest

from affordvla.data.action_datamodule import ActionWindowDataModule
from affordvla.data.calvin import write_calvin_split


@pytest.fixture(scope="module")
def calvin_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("calvin_task")
    write_calvin_split(root / "training", [12], [(0, 5, "open the drawer", "open_drawer"), (6, 11, "lift", "lift")])
    write_calvin_split(root / "validation", [6], [(0, 5, "push the button", "push_button")], seed=1)
    return root


def test_calvin_direct_and_cached_batches_are_identical(calvin_root, tmp_path):
    direct = ActionWindowDataModule("calvin", str(calvin_root), window_size=3, chunk_size=2, batch_size=4)
    cached = ActionWindowDataModule("calvin", str(calvin_root), window_size=3, chunk_size=2, batch_size=4,
                                    cache_dir=str(tmp_path / "cache"))
    direct.setup()
    cached.setup()
    assert (tmp_path / "cache" / "calvin_calvin_task0_training.h5").is_file()
    a, b = next(iter(direct.train_dataloader())), next(iter(cached.train_dataloader()))
    assert a["instructions"] == b["instructions"]
    for key in ("actions", "action_mask", "frame_mask", "state"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    np.testing.assert_array_equal(a["images"]["rgb_gripper"].numpy(), b["images"]["rgb_gripper"].numpy())
    assert a["images"]["rgb_static"].shape == (4, 3, 200, 200, 3) and a["actions"].shape == (4, 3, 2, 7)
    meta = cached.metadata()
    assert meta["action_dim"] == 7 and meta["state_dim"] == 15 and meta["sizes"] == {"train": 12, "val": 6}
    assert meta["cameras"] == {"rgb_static": [200, 200, 3], "rgb_gripper": [84, 84, 3]}
    assert meta["action_statistics"]["count"] == 12 and len(meta["action_statistics"]["q01"]) == 7


def test_oxe_through_the_cache(tmp_path):
    from test_oxe import _fractal_episode

    from affordvla.data.oxe import write_rlds_dataset

    write_rlds_dataset(tmp_path / "oxe", "fractal20220817_data", {"train": [_fractal_episode(s) for s in range(3)],
                                                                  "val": [_fractal_episode(7)]})
    module = ActionWindowDataModule("oxe", str(tmp_path / "oxe"), name="fractal20220817_data", train_split="train",
                                    val_split="val", window_size=2, chunk_size=3, batch_size=2,
                                    cache_dir=str(tmp_path / "cache"))
    module.setup()
    batch = next(iter(module.train_dataloader()))
    assert batch["images"]["primary"].shape == (2, 2, 16, 16, 3) and batch["actions"].shape == (2, 2, 3, 7)
    assert module.metadata()["sizes"] == {"train": 12, "val": 4}


def test_wrong_configuration_is_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown episode source 'rlds'; valid"):
        ActionWindowDataModule("rlds", str(tmp_path))
    with pytest.raises(ValueError, match="needs `name`"):
        ActionWindowDataModule("oxe", str(tmp_path))


def test_the_entrypoint_refuses_a_module_that_does_not_match_the_data(calvin_root, tmp_path):
    from conftest import compose_train

    from affordvla.train import train

    cfg = compose_train(["dataset=calvin", f"dataset.root={calvin_root}", "logger=none"], tmp_path / "run")
    with pytest.raises(ValueError, match="yields action_window samples but module "
                                         "affordvla.policies.keypoints.KeypointPolicyModule trains on keypoints "
                                         "samples; use module=action_policy"):
        train(cfg)
    cfg = compose_train(["module=action_policy", "head=lstm", "logger=none"], tmp_path / "run2")
    with pytest.raises(ValueError, match="yields keypoints samples .* use module=keypoint_text"):
        train(cfg)
