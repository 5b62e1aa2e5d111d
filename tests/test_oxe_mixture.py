"""Open X-Embodiment mixtures: checked when the config is instantiated, weighted sampling through the per-dataset
HDF5 caches, and a smoke training run on five datasets."""

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from affordvla.data.h5cache import CacheError
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
                       match=r"\['nyu_door_opening_surprising_effectiveness'\] \(dataset.mixture, data root "
                             r".*nothing_here\) "
                             r"have no"):
        instantiate(cfg.dataset)
    assert not (tmp_path / "nothing_here").exists()  # nothing read or written before the error


def _write_mixture(root, unlabeled: dict[str, dict[str, int]]):
    """bridge_orig and language_table, 3 train / 1 val labelled episodes of 6 steps each, plus `unlabeled`
    episodes per dataset and split whose instruction is empty (language_table: all-zero code points)."""
    from affordvla.data.oxe import write_rlds_dataset
    from affordvla.offline.toy_oxe import synthetic_episode

    for index, name in enumerate(("bridge_orig", "language_table")):
        episodes = {}
        for split, labelled in (("train", 3), ("val", 1)):
            rng = np.random.default_rng([index, len(split)])
            episodes[split] = [synthetic_episode(SPECS[name], 6, rng, f"{name} task {e}") for e in range(labelled)]
            episodes[split] += [synthetic_episode(SPECS[name], 6, rng, "")
                                for _ in range(unlabeled[name][split])]
        write_rlds_dataset(root, name, episodes, shards=2)


def test_mixture_datamodule_weights_statistics_and_unlabeled_counts(tmp_path):
    import h5py

    from affordvla.data.oxe import RLDSDataset
    from affordvla.data.oxe.datamodule import OXEMixtureDataModule
    from affordvla.heads.action_normalization import ActionNormalizer

    unlabeled = {"bridge_orig": {"train": 2, "val": 1}, "language_table": {"train": 1, "val": 0}}
    _write_mixture(tmp_path / "oxe", unlabeled)
    settings = {"cache_dir": str(tmp_path / "cache"), "image_size": 24, "cameras": ("primary", "wrist"),
                "window_size": 2, "chunk_size": 2, "batch_size": 2, "balance_weights": False}
    module = OXEMixtureDataModule(str(tmp_path / "oxe"), [["bridge_orig", 1.0], ["language_table", 3.0]], **settings)
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
    assert meta["unlabeled_episodes"] == unlabeled  # left out of training and validation, counted
    assert meta["action_dim"] == 7 and set(meta["dataset_statistics"]) == {"bridge_orig", "language_table"}

    # each dataset's statistics come from its train cache and equal those of the standardised TFRecord episodes
    for name in ("bridge_orig", "language_table"):
        raw = np.concatenate([e.actions for e in RLDSDataset.open(tmp_path / "oxe", name).episodes(
            "train", decode_images=False)]).astype(np.float64)
        stats = meta["dataset_statistics"][name]
        assert stats["count"] == len(raw) and stats["episodes"] == 3
        np.testing.assert_allclose(stats["q01"], np.quantile(raw, 0.01, axis=0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats["q99"], np.quantile(raw, 0.99, axis=0), rtol=1e-6, atol=1e-9)
    assert meta["dataset_statistics"]["language_table"]["min"][6] == 1.0  # its gripper is always open

    # each dataset normalised with its own bounds, by hand: 2 (x - q01) / (q99 - q01 + 1e-8) - 1, clipped;
    # constant dimensions (language_table's padded rotation, q01 == q99) are 0; the gripper is left as it is
    for i in (0, len(train) - 1):
        sample, part = train[i], train.parts[train.part_index[i]]
        raw = part.part[int(train.item_index[i])].actions.astype(np.float64)
        q01, q99 = (np.asarray(meta["dataset_statistics"][sample.meta["dataset"]][k]) for k in ("q01", "q99"))
        expected = np.clip(2 * (raw[..., :6] - q01[:6]) / (q99[:6] - q01[:6] + 1e-8) - 1, -1, 1)
        expected[..., q01[:6] == q99[:6]] = 0.0
        np.testing.assert_allclose(sample.actions[..., :6], expected, atol=1e-6)
        np.testing.assert_array_equal(sample.actions[..., 6], raw[..., 6])
    assert (np.abs(train[len(train) - 1].actions[..., 3:6]) == 0).all()  # language_table: no rotation
    assert meta["action_statistics"]["count"] == 3 * 4 + 3 * 6  # the normalised mixture, every step once
    assert -1 <= min(meta["action_statistics"]["min"][:6]) and max(meta["action_statistics"]["max"][:6]) <= 1

    # the head takes the normalised actions as they are and keeps each dataset's bounds for un-normalising
    normalizer = ActionNormalizer.from_metadata(meta, mode="clip", clip_bound=0.65)
    assert normalizer.mode == "identity" and set(normalizer.datasets) == {"bridge_orig", "language_table"}
    restored = ActionNormalizer.from_dict(normalizer.to_dict())
    raw, normalised = train.parts[0].part[0].actions, train.parts[0][0].actions  # bridge_orig's first window
    back = restored.unnormalize(torch.from_numpy(normalised), "bridge_orig").numpy()
    q01, q99 = (np.asarray(meta["dataset_statistics"]["bridge_orig"][k][:6]) for k in ("q01", "q99"))
    # inside the bounds the round trip is exact; outside it gives the bound the value was clipped to
    np.testing.assert_allclose(back[..., :6], np.clip(raw[..., :6], q01, q99), atol=1e-6)
    assert (np.abs(normalised[..., :6]) < 1).sum() > 0
    np.testing.assert_array_equal(back[..., 6], raw[..., 6])
    with pytest.raises(ValueError, match=r"give unnorm_key, one of \['bridge_orig', 'language_table'\]"):
        restored.unnormalize(torch.from_numpy(raw))

    caches = sorted(p.name for p in (tmp_path / "cache").glob("oxe_*.h5"))
    assert [c.rsplit("_", 1)[0] for c in caches] == [
        "oxe_bridge_orig_train_24px_primary-wrist", "oxe_bridge_orig_val_24px_primary-wrist",
        "oxe_language_table_train_24px_primary-wrist", "oxe_language_table_val_24px_primary-wrist"]
    with h5py.File(tmp_path / "cache" / caches[0], "r") as f:
        assert f.attrs["unlabeled_episodes"] == 2
        assert json.loads(f.attrs["source"])["root"] == str((tmp_path / "oxe").resolve())

    # another copy of the data is another cache, never the old one
    shutil.copytree(tmp_path / "oxe", tmp_path / "copy")
    other = OXEMixtureDataModule(str(tmp_path / "copy"), [["bridge_orig", 1.0], ["language_table", 3.0]], **settings)
    other.setup()
    assert len(list((tmp_path / "cache").glob("oxe_*.h5"))) == 8
    assert other.metadata()["unlabeled_episodes"] == unlabeled

    # a cache whose stored source disagrees with its name is refused, naming the file
    del module, other, train
    gc.collect()  # the readers' h5py handles
    with h5py.File(tmp_path / "cache" / caches[0], "a") as f:
        f.attrs["source"] = json.dumps({"root": "/elsewhere"})
    again = OXEMixtureDataModule(str(tmp_path / "oxe"), [["bridge_orig", 1.0], ["language_table", 3.0]], **settings)
    with pytest.raises(CacheError, match=rf"{caches[0]} caches .*/elsewhere"):
        again.setup()


def test_skip_unlabeled_false_keeps_and_counts_nothing(tmp_path):
    from affordvla.data.oxe.datamodule import OXEMixtureDataModule

    unlabeled = {"bridge_orig": {"train": 2, "val": 1}, "language_table": {"train": 1, "val": 0}}
    _write_mixture(tmp_path / "oxe", unlabeled)
    module = OXEMixtureDataModule(str(tmp_path / "oxe"), "bridge", cache_dir=str(tmp_path / "cache"),
                                  image_size=16, skip_unlabeled=False, batch_size=2)
    module.setup()
    assert module.metadata()["unlabeled_episodes"] == {"bridge_orig": {"train": 0, "val": 0}}
    assert module.metadata()["dataset_statistics"]["bridge_orig"]["episodes"] == 5


def test_stream_counts_unlabeled_episodes(tmp_path):
    from affordvla.data.oxe import OXEMixtureStream

    unlabeled = {"bridge_orig": {"train": 2, "val": 1}, "language_table": {"train": 1, "val": 0}}
    _write_mixture(tmp_path, unlabeled)
    stream = OXEMixtureStream(tmp_path, [("bridge_orig", 1.0), ("language_table", 1.0)], "train",
                              shuffle_buffer=1, image_size=16)
    assert stream.metadata()["unlabeled_complete"] == {"bridge_orig": False, "language_table": False}
    samples = [s for _, s in zip(range(200), stream)]  # more than one pass over each (12 + 18 windows)
    assert all(s.instruction for s in samples)
    meta = stream.metadata()
    assert meta["unlabeled_episodes"] == {"bridge_orig": {"train": 2}, "language_table": {"train": 1}}
    assert meta["unlabeled_complete"] == {"bridge_orig": True, "language_table": True}


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
    root = Path(cfg.dataset.root)  # the generated folder, named by its settings
    assert root.parent == tmp_path / "outputs" / "data" / "smoke"
    assert (root / "bridge_orig" / "1.0.0" / "bridge_dataset-train.tfrecord-00000-of-00002").is_file()
    caches = list((tmp_path / "outputs" / "data" / "cache").glob("oxe_*_train_32px_primary_*.h5"))
    assert sorted(p.name.split("_train")[0][4:] for p in caches) == sorted(FIVE)


def test_a_session_of_a_mixture_policy_needs_its_unnorm_key():
    from types import SimpleNamespace

    from affordvla.heads.action_normalization import ActionNormalizer
    from affordvla.policies.actions import ActionPolicyModuleBase

    bounds = {"q01": [-1.0] * 7, "q99": [1.0] * 7}
    normalizer = ActionNormalizer(7, "identity", gripper_low=0.0,
                                  datasets={"bridge_orig": bounds, "fractal20220817_data": bounds})
    with pytest.raises(ValueError, match=r"give unnorm_key, one of \['bridge_orig', 'fractal20220817_data'\]"):
        # what a session (and a batched predict) checks before its first step
        ActionPolicyModuleBase.check_ready(SimpleNamespace(normalizer=normalizer))
    with pytest.raises(ValueError, match=r"unnorm_key 'kuka' is not among"):
        ActionPolicyModuleBase.check_ready(SimpleNamespace(normalizer=normalizer), unnorm_key="kuka")
    # a hand-worked inverse: [-1, 1] -> [q01, q99] = [0, 0.2]; the gripper stays binary
    single = ActionNormalizer(3, "identity", gripper_low=0.0,
                              datasets={"kuka": {"q01": [0.0, 0.0, 0], "q99": [0.2, 0.4, 1]}})
    back = single.unnormalize(torch.tensor([[-1.0, 0.5, 1.0]]))
    np.testing.assert_allclose(back.numpy(), [[0.0, 0.3, 1.0]], atol=1e-6)
