"""The HDF5 episode cache gives the same windows as the sources, and its conversion resumes after a crash."""

import h5py
import numpy as np
import pytest

from affordvla.data.calvin import CalvinWindowDataset, write_calvin_split
from affordvla.data.cli import main
from affordvla.data.h5cache import (
    CachedWindowDataset,
    CacheError,
    calvin_episodes,
    convert,
    oxe_episodes,
)
from affordvla.data.oxe import RLDSDataset, episode_windows


def _assert_same(a, b):
    assert a.instruction == b.instruction
    for camera in a.images:
        np.testing.assert_array_equal(a.images[camera], b.images[camera])
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.action_mask, b.action_mask)
    np.testing.assert_array_equal(a.frame_mask, b.frame_mask)
    if a.state is not None or b.state is not None:
        np.testing.assert_array_equal(a.state, b.state)


@pytest.fixture(scope="module")
def calvin_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("calvin") / "training"
    return write_calvin_split(root, [10, 6], [(1, 5, "open the drawer", "open_drawer"), (10, 13, "lift", "lift")])


def test_calvin_cache_windows_equal_the_reader(calvin_split, tmp_path):
    out = tmp_path / "calvin.h5"
    assert main(["convert", "calvin", str(calvin_split), str(out)]) == 0
    source = CalvinWindowDataset(calvin_split, window_size=3, chunk_size=2)
    cached = CachedWindowDataset(out, window_size=3, chunk_size=2, anchor="forward")
    assert len(cached) == len(source) == 5 + 4
    for i in range(len(source)):
        _assert_same(cached[i], source[i])
    with h5py.File(out) as f:
        images = f["episodes/0000000/images/rgb_static"]
        assert images.chunks == (1, 200, 200, 3) and images.compression == "lzf"


def test_oxe_cache_windows_equal_the_reader(tmp_path):
    from test_oxe import _fractal_episode

    from affordvla.data.oxe import write_rlds_dataset

    write_rlds_dataset(tmp_path / "oxe", "fractal20220817_data", {"train": [_fractal_episode(s) for s in range(3)]})
    out = tmp_path / "fractal.h5"
    convert(oxe_episodes(tmp_path / "oxe", "fractal20220817_data", "train"), out, source="x", source_format="oxe")
    expected = [w for e in RLDSDataset.open(tmp_path / "oxe", "fractal20220817_data").episodes("train")
                for w in episode_windows(e, 2, 3)]
    cached = CachedWindowDataset(out, window_size=2, chunk_size=3)
    assert len(cached) == len(expected) == 3 * 4
    for i, window in enumerate(expected):
        _assert_same(cached[i], window)


def test_conversion_resumes_without_duplicates(calvin_split, tmp_path):
    out = tmp_path / "resume.h5"

    def crashing():
        for i, record in enumerate(calvin_episodes(calvin_split)):
            if i == 1:
                raise KeyboardInterrupt  # killed while reading the second episode
            yield record

    with pytest.raises(KeyboardInterrupt):
        convert(crashing(), out, source="s", source_format="calvin")
    with pytest.raises(CacheError, match="incomplete"):
        CachedWindowDataset(out, 2, 2)
    with h5py.File(out, "a") as f:  # and a half-written second episode, as a crash mid-write leaves it
        f["episodes"].create_group("0000001").create_dataset("actions", data=np.zeros((2, 7)))
    assert convert(calvin_episodes(calvin_split), out, source="s", source_format="calvin") == \
        {"written": 1, "skipped": 1}
    with h5py.File(out) as f:
        assert sorted(f["episodes"]) == ["0000000", "0000001"] and f.attrs["complete"]
        assert f["episodes/0000001"].attrs["length"] == 4
    with pytest.raises(CacheError, match="caches 's', not 'other'"):
        convert(calvin_episodes(calvin_split), out, source="other", source_format="calvin")


def test_cli_reports_bad_sources(tmp_path, capsys):
    assert main(["convert", "oxe", str(tmp_path), str(tmp_path / "x.h5")]) == 1
    assert "needs --name" in capsys.readouterr().err
    assert main(["convert", "calvin", str(tmp_path / "none"), str(tmp_path / "x.h5")]) == 1
    assert "auto_lang_ann.npy does not exist" in capsys.readouterr().err
    with pytest.raises(CacheError, match="does not exist; create it with"):
        CachedWindowDataset(tmp_path / "missing.h5", 1, 1)


def test_rlbench_episodes_cache_with_llarva_actions(tmp_path):
    from affordvla.data.rlbench import write_episode

    rng = np.random.default_rng(0)
    observations = [{"joint_positions": rng.uniform(-1, 1, 7), "joint_velocities": rng.uniform(-1, 1, 7),
                     "gripper_open": float(t < 3), "misc": {}} for t in range(5)]
    frames = [np.full((8, 8, 3), 10 * t, np.uint8) for t in range(5)]
    write_episode(tmp_path / "reach" / "variation0" / "episodes" / "episode0", observations,
                  images={"front_rgb": frames, "wrist_rgb": frames})
    import pickle

    with open(tmp_path / "reach" / "variation0" / "variation_descriptions.pkl", "wb") as f:
        pickle.dump(["reach the red target"], f)
    out = tmp_path / "reach.h5"
    assert main(["convert", "rlbench", str(tmp_path / "reach"), str(out), "--cameras", "front", "wrist"]) == 0
    data = CachedWindowDataset(out, window_size=1, chunk_size=2)
    assert len(data) == 4  # the last frame has no next action
    first = data[0]
    assert first.instruction == "reach the red target"
    np.testing.assert_allclose(first.actions[0, 0], [*observations[1]["joint_velocities"], 1.0], rtol=1e-6)
    np.testing.assert_allclose(first.actions[0, 1], [*observations[2]["joint_velocities"], 1.0], rtol=1e-6)
    assert data[3].actions[0, 0, 7] == 0.0 and not data[3].action_mask[0, 1]
    np.testing.assert_array_equal(data[2].images["wrist"][0], frames[2])


def test_keypoint_caches_give_the_reader_samples(tmp_path):
    from affordvla.data.datamodule import KalieDataModule
    from affordvla.data.h5cache import KeypointCache
    from affordvla.data.kalie import load_kalie_sample, read_kalie_index
    from affordvla.data.robopoint import point_entry, write_conversations
    from affordvla.offline.toy_kalie import ensure_toy_kalie

    root = ensure_toy_kalie(tmp_path / "kalie", seed=1, image_size=48, splits={"train": 6, "val": 2, "test": 2})
    assert main(["convert", "kalie", str(root), str(tmp_path / "kalie.h5")]) == 0
    cache = KeypointCache(tmp_path / "kalie.h5")
    for entry in read_kalie_index(root)[0]:
        direct, cached = load_kalie_sample(entry), cache.get(entry.key)
        np.testing.assert_array_equal(cached.image, direct.image)
        np.testing.assert_array_equal(cached.keypoints, direct.keypoints)
        assert (cached.instruction, cached.task, cached.point_names, cached.meta) == \
            (direct.instruction, direct.task, direct.point_names, direct.meta)
    # the datamodule reads through a cache it builds on first use
    plain = KalieDataModule(str(root), generate=None)
    cached_dm = KalieDataModule(str(root), generate=None, cache_dir=str(tmp_path / "cache"))
    plain.setup()
    cached_dm.setup()
    assert (tmp_path / "cache" / "kalie_kalie.h5").is_file()
    np.testing.assert_array_equal(cached_dm.splits["test"][1].image, plain.splits["test"][1].image)
    # RoboPoint conversations
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), 9, np.uint8)).save(tmp_path / "images" / "a.png")
    path = write_conversations(tmp_path / "rp.json", [point_entry("e1", "a.png", "q", np.array([[0.25, 0.5]]))])
    assert main(["convert", "robopoint", str(path), str(tmp_path / "rp.h5"), "--images", str(tmp_path / "images")]) == 0
    sample = KeypointCache(tmp_path / "rp.h5").get("e1#0")
    assert sample.point_names == ("Point 1",) and sample.image.shape == (10, 12, 3)
    np.testing.assert_allclose(sample.keypoints, [[0.25, 0.5]])
