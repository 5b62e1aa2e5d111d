"""Open X-Embodiment mixtures: checked when the config is instantiated, weighted sampling through the per-dataset
HDF5 caches, and a smoke training run on five datasets."""

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from affordvla.data.oxe import MIXTURES, SPECS, resolve_mixture

FIVE = ["fractal20220817_data", "bridge_orig", "taco_play", "language_table", "kuka"]


def test_every_dataset_of_the_mixtures_has_a_standardisation():
    for name, entries in MIXTURES.items():
        assert resolve_mixture(name) == entries
    assert len(MIXTURES["oxe_magic_soup"]) == 23
    assert set(SPECS) >= {n for entries in MIXTURES.values() for n, _ in entries}
    # OpenVLA's plus-minus soup: the magic soup without language_table, fractal at 1, and bc_z, fmb and dobbe
    plus_minus = dict(MIXTURES["oxe_magic_soup_plus_minus"])
    assert len(plus_minus) == 25 and "language_table" not in plus_minus and plus_minus["fractal20220817_data"] == 1.0
    assert [(n, plus_minus[n]) for n in ("bc_z", "fmb_dataset", "dobbe")] == [("bc_z", 0.2), ("fmb_dataset", 1.0),
                                                                              ("dobbe", 0.2)]
    assert sum(plus_minus.values()) == pytest.approx(28.2 + 0.8341046294 + 1.0 - 0.1 + 1.4)


def test_unknown_dataset_fails_when_the_config_is_instantiated(tmp_path):
    from conftest import compose_train

    cfg = compose_train(["experiment=toy_actions_mlp", "dataset=oxe_mixture", "logger=none",
                         f"paths.root_dir={tmp_path}",
                         f"dataset.root={tmp_path}/nothing_here",
                         "dataset.mixture=[[bridge_orig,1.0],[nyu_door_opening_surprising_effectiveness,1.0]]"],
                        tmp_path / "run")
    with pytest.raises(InstantiationException,
                       match=r"\['nyu_door_opening_surprising_effectiveness'\] \(data root .*nothing_here\) have no"):
        instantiate(cfg.dataset)
    assert not (tmp_path / "nothing_here").exists()  # nothing read or written before the error


def test_mixture_datamodule_weights_and_statistics(tmp_path):
    from affordvla.data.oxe.datamodule import OXEMixtureDataModule

    module = OXEMixtureDataModule(str(tmp_path / "oxe"), [["bridge_orig", 1.0], ["language_table", 3.0]],
                                  cache_dir=str(tmp_path / "cache"), image_size=24, cameras=("primary", "wrist"),
                                  window_size=2, chunk_size=2, batch_size=2, balance_weights=False,
                                  generate={"train_episodes": 3, "val_episodes": 1, "episode_length": 6})
    module.setup()
    assert module.probabilities == {"bridge_orig": 0.25, "language_table": 0.75}
    train = module.splits["train"]
    drawn = [train[i].meta["dataset"] for i in range(len(train))]
    # 3 x 4 bridge + 3 x 6 language_table windows = 30 indices, shared 0.25 / 0.75: 7.5 -> 8 and 22.5 -> 22
    assert (drawn.count("bridge_orig"), drawn.count("language_table")) == (8, 22)
    sample = train[0]
    assert sample.images["primary"].shape == (2, 24, 24, 3) and sample.images["wrist"].shape == (2, 24, 24, 3)
    assert not sample.images["wrist"].any()  # neither dataset has a wrist camera: black frames
    # bridge: 6 steps -> 4 (step 0 and the last dropped); language_table keeps its 6
    assert len(module.splits["val"]) == 4 + 6
    meta = module.metadata()
    assert meta["action_dim"] == 7 and set(meta["dataset_statistics"]) == {"bridge_orig", "language_table"}
    assert meta["dataset_statistics"]["language_table"]["min"][6] == 1.0  # its gripper is always open
    assert meta["action_statistics"]["count"] == 3 * 4 + 3 * 6
    assert sorted(p.name for p in (tmp_path / "cache").glob("oxe_*.h5")) == [
        "oxe_bridge_orig_train_24px_primary-wrist.h5", "oxe_bridge_orig_val_24px_primary-wrist.h5",
        "oxe_language_table_train_24px_primary-wrist.h5", "oxe_language_table_val_24px_primary-wrist.h5"]


def test_five_dataset_mixture_trains_at_smoke_scale(tmp_path):
    """`dataset=oxe_mixture scale=smoke` writes each dataset in its published layout and trains through the
    HDF5 episode caches."""
    from conftest import compose_train

    from affordvla.train import train

    mixture = "[" + ",".join(f"[{name},1.0]" for name in FIVE) + "]"
    cfg = compose_train(["experiment=toy_actions_mlp", "dataset=oxe_mixture", "scale=smoke", "logger=none",
                         f"dataset.mixture={mixture}", "dataset.image_size=32", f"paths.root_dir={tmp_path}"],
                        tmp_path / "run")
    metrics = train(cfg)
    assert np.isfinite(metrics["val/action_mse"]) and metrics["test/count"] == 2
    root = tmp_path / "outputs" / "data" / "smoke" / "oxe-mixture-e2"
    assert (root / "bridge_orig" / "1.0.0" / "bridge_dataset-train.tfrecord-00000-of-00002").is_file()
    caches = list((tmp_path / "outputs" / "data" / "cache").glob("oxe_*_train_32px_primary.h5"))
    assert sorted(p.name.split("_train")[0][4:] for p in caches) == sorted(FIVE)
