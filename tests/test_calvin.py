"""CALVIN split reader: windows, chunks, masks and statistics, from a split written in CALVIN's layout."""

import pickle

import numpy as np
import pytest

from affordvla.data.calvin import (
    CalvinFormatError,
    CalvinWindowDataset,
    fixture_frame,
    frame_path,
    read_episode_ranges,
    write_calvin_split,
)
from affordvla.data.safe_pickle import UnsafePickleError, load_object_npy


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("calvin") / "task_D_D" / "training"
    # two play episodes (frames 100-111 and 112-119); two annotated segments
    return write_calvin_split(root, [12, 8], [(102, 106, "open the drawer", "open_drawer"),
                                              (113, 116, "push the blue block left", "push_blue_block_left")],
                              first_frame=100)


def test_layout_is_calvins(split):
    assert frame_path(split, 100).name == "episode_0000100.npz"
    np.testing.assert_array_equal(read_episode_ranges(split), [[100, 111], [112, 119]])
    with np.load(frame_path(split, 105)) as npz:
        assert npz["rgb_static"].shape == (200, 200, 3) and npz["rgb_gripper"].dtype == np.uint8
        assert npz["robot_obs"].shape == (15,) and npz["scene_obs"].shape == (24,)
    annotations = load_object_npy(split / "lang_annotations" / "auto_lang_ann.npy")
    assert annotations["info"]["indx"] == [(102, 106), (113, 116)]
    assert annotations["language"]["emb"].shape == (2, 1, 384)


def test_one_sample_per_annotated_start_frame(split):
    data = CalvinWindowDataset(split, window_size=3, chunk_size=2)
    assert len(data) == 5 + 4
    first = data[0]
    assert first.instruction == "open the drawer" and first.meta["start_frame"] == 102
    np.testing.assert_array_equal(first.images["rgb_static"][1], fixture_frame(103)["rgb_static"])
    np.testing.assert_allclose(first.actions[2, 1], fixture_frame(105)["rel_actions"].astype(np.float32))
    assert first.actions.shape == (3, 2, 7) and first.state.shape == (3, 15)
    assert first.action_mask.all() and first.frame_mask.all()


def test_steps_past_the_segment_end_repeat_the_last_frame_and_are_masked(split):
    data = CalvinWindowDataset(split, window_size=3, chunk_size=2)
    last = data[4]  # starts at 106, the segment's last frame
    assert last.meta["start_frame"] == 106
    np.testing.assert_array_equal(last.frame_mask, [True, False, False])
    np.testing.assert_array_equal(last.action_mask, [[True, False], [False, False], [False, False]])
    repeated = fixture_frame(106)
    for t in range(3):
        np.testing.assert_array_equal(last.images["rgb_gripper"][t], repeated["rgb_gripper"])
    np.testing.assert_allclose(last.actions[1, 1], repeated["rel_actions"].astype(np.float32))


def test_action_statistics_cover_each_annotated_frame_once(split):
    before = sorted(p.name for p in split.iterdir())
    stats = CalvinWindowDataset(split, window_size=2, chunk_size=3).action_statistics()
    assert sorted(p.name for p in split.iterdir()) == before  # no cache folder given: the data is not written to
    values = np.stack([fixture_frame(f)["rel_actions"] for f in [*range(102, 107), *range(113, 117)]])
    assert stats["count"] == 9
    np.testing.assert_allclose(stats["mean"], values.mean(0))
    np.testing.assert_allclose(stats["q99"], np.quantile(values, 0.99, axis=0))
    assert set(np.round(stats["min"][6:], 6)) <= {-1.0, 1.0}


def test_action_statistics_are_cached_by_the_split_index(split, tmp_path):
    import json

    dataset = CalvinWindowDataset(split, window_size=2, chunk_size=3)
    stats = dataset.action_statistics(cache_dir=tmp_path)
    (cache,) = tmp_path.glob("affordvla_action_stats_*.json")
    assert json.loads(cache.read_text()) == stats
    cache.write_text(json.dumps({**stats, "count": -1}))
    assert dataset.action_statistics(cache_dir=tmp_path)["count"] == -1  # read back, not recomputed
    # another action key is another cache entry
    dataset.action_key = "actions"
    assert dataset.action_statistics(cache_dir=tmp_path)["count"] == 9 and len(list(tmp_path.glob("*.json"))) == 2
    # a place that cannot hold the cache (here a file, not a folder) only costs the recomputation
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    assert dataset.action_statistics(cache_dir=blocked)["count"] == 9


def test_tampered_annotation_pickle_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "auto_lang_ann.npy"
    np.save(path, np.array(Exploit(), dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match=r"auto_lang_ann\.npy: refusing to load global (posix|os|nt)\.system"):
        load_object_npy(path)


def test_truncated_annotation_and_bad_frames_name_the_file(split, tmp_path):
    good = (split / "lang_annotations" / "auto_lang_ann.npy").read_bytes()
    broken = tmp_path / "lang_annotations" / "auto_lang_ann.npy"
    broken.parent.mkdir()
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(pickle.UnpicklingError, match="auto_lang_ann.npy: corrupt or truncated"):
        CalvinWindowDataset(tmp_path)
    copy = tmp_path / "copy"
    write_calvin_split(copy, [4], [(0, 3, "lift", "lift")])
    frame_path(copy, 2).write_bytes(b"PK\x03\x04 not really a zip")
    data = CalvinWindowDataset(copy, window_size=1, chunk_size=1)
    with pytest.raises(CalvinFormatError, match="episode_0000002.npz: unreadable frame"):
        data[2]
    frame_path(copy, 3).unlink()
    with pytest.raises(CalvinFormatError, match="episode_0000003.npz does not exist"):
        data[3]
    with pytest.raises(CalvinFormatError, match="nowhere does not exist"):
        CalvinWindowDataset(tmp_path / "nowhere")


def test_wrong_shapes_and_nan_actions_name_the_frame(tmp_path):
    root = write_calvin_split(tmp_path, [3], [(0, 2, "lift", "lift")])
    frame = fixture_frame(1)
    frame["rel_actions"][2] = np.nan
    np.savez_compressed(frame_path(root, 1), **frame)
    frame = fixture_frame(2)
    frame["rgb_static"] = frame["rgb_static"].astype(np.float32)
    np.savez_compressed(frame_path(root, 2), **frame)
    data = CalvinWindowDataset(root, window_size=1, chunk_size=1)
    with pytest.raises(CalvinFormatError, match=r"episode_0000001.npz: rel_actions holds NaN"):
        data[1]
    with pytest.raises(CalvinFormatError, match=r"episode_0000002.npz: rgb_static must be an HxWxC uint8 image"):
        data[2]
    frame = fixture_frame(0)
    frame["robot_obs"] = frame["robot_obs"][:14]
    np.savez_compressed(frame_path(root, 0), **frame)
    with pytest.raises(CalvinFormatError, match=r"episode_0000000.npz: robot_obs has shape \(14,\), expected \(15,\)"):
        data[0]


def test_the_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "lang_annotations" / "auto_lang_ann.npy"
    path.parent.mkdir()
    np.save(path, np.array({"info": Exploit()}, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError):
        CalvinWindowDataset(tmp_path)
    assert not marker.exists()
