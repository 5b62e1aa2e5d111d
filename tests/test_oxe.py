"""TFRecord framing, tf.train.Example decoding and RLDS (Open X-Embodiment) episodes, all without TensorFlow."""

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from affordvla.data.oxe import (
    MIXTURES,
    OXEFormatError,
    RLDSDataset,
    binarize_gripper,
    episode_windows,
    mixture_weights,
    relative_to_absolute_gripper,
    stream_mixture,
    write_rlds_dataset,
)
from affordvla.data.tfrecord import (
    TFRecordError,
    encode_example,
    masked_crc32c,
    parse_example,
    read_records,
    write_records,
)


def test_masked_crc_matches_the_definition():
    crc = 0xE3069283  # CRC32C of b"123456789", the standard check value
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_example_bytes_are_tensorflows():
    # Example{features{feature{key: "a", value{int64_list{value: [1]}}}}}, serialized by hand
    expected = b"\x0a\x0c\x0a\x0a\x0a\x01a\x12\x05\x1a\x03\x0a\x01\x01"
    assert encode_example({"a": np.array([1])}) == expected
    assert parse_example(expected)["a"].tolist() == [1]


def test_example_round_trip_and_unpacked_encodings():
    features = {"f": np.array([0.5, -2.25], np.float32), "i": np.array([3, -7, 2**40]),
                "b": [b"\x00\xffjpeg", "text"]}
    decoded = parse_example(encode_example(features))
    np.testing.assert_array_equal(decoded["f"], features["f"])
    assert decoded["i"].tolist() == [3, -7, 2**40] and decoded["b"] == [b"\x00\xffjpeg", b"text"]
    # unpacked float (fixed32, wire type 5) and int (varint, wire type 0) values, as older writers emit
    floats = b"\x0d" + struct.pack("<f", 1.5) + b"\x0d" + struct.pack("<f", 2.5)
    ints = b"\x08\x05\x08\x06"
    feature_f = b"\x12" + bytes([len(floats)]) + floats
    feature_i = b"\x1a" + bytes([len(ints)]) + ints

    def entry(key, feature):
        body = b"\x0a\x01" + key + b"\x12" + bytes([len(feature)]) + feature
        return b"\x0a" + bytes([len(body)]) + body

    features_msg = entry(b"x", feature_f) + entry(b"y", feature_i)
    example = b"\x0a" + bytes([len(features_msg)]) + features_msg
    decoded = parse_example(example)
    assert decoded["x"].tolist() == [1.5, 2.5] and decoded["y"].tolist() == [5, 6]


def test_record_framing_round_trip_and_corruption(tmp_path):
    path = write_records(tmp_path / "x.tfrecord", [b"first", b"", b"third record"])
    assert list(read_records(path)) == [b"first", b"", b"third record"]
    raw = bytearray(path.read_bytes())
    assert struct.unpack("<Q", raw[:8])[0] == 5
    raw[12] ^= 1  # a flipped bit in the first record's data
    path.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match=r"x\.tfrecord: record 0 at byte 0: data checksum mismatch"):
        list(read_records(path))
    raw[12] ^= 1
    raw[8] ^= 1  # the length checksum
    path.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match="record 0 at byte 0: length checksum mismatch"):
        list(read_records(path))
    raw[8] ^= 1
    path.write_bytes(bytes(raw[:-3]))
    with pytest.raises(TFRecordError, match=r"record 2 at byte 37: truncated data"):
        list(read_records(path))


def _jpeg(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _bridge_episode(seed, steps=6):
    rng = np.random.default_rng(seed)
    state = np.cumsum(rng.uniform(-0.01, 0.01, (steps, 7)), axis=0).astype(np.float32)
    action = rng.uniform(-0.02, 0.02, (steps, 7)).astype(np.float32)
    action[:, 6] = [1.0, 0.97, 0.5, 0.02, 0.6, 0.99][:steps]
    return {"steps/observation/image_0": [_jpeg(10 * t + seed) for t in range(steps)],
            "steps/observation/state": state.reshape(-1), "steps/action": action.reshape(-1),
            "steps/language_instruction": [f"put the spoon {seed} in the pot".encode()] * steps,
            "steps/is_first": np.array([1] + [0] * (steps - 1)), "steps/is_last": np.array([0] * (steps - 1) + [1]),
            "steps/reward": np.zeros(steps, np.float32), "episode_metadata/file_path": [f"/raw/{seed}.npy".encode()]}


def _fractal_episode(seed, steps=4):
    rng = np.random.default_rng(seed)
    return {"steps/observation/image": [_jpeg(20 * t) for t in range(steps)],
            "steps/action/world_vector": rng.uniform(-1, 1, steps * 3).astype(np.float32),
            "steps/action/rotation_delta": rng.uniform(-1, 1, steps * 3).astype(np.float32),
            "steps/action/gripper_closedness_action": np.array([0.0, 1.0, 0.0, -1.0][:steps], np.float32),
            "steps/observation/natural_language_instruction": [b"pick coke can"] * steps}


@pytest.fixture(scope="module")
def oxe_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("oxe")
    write_rlds_dataset(root, "bridge_orig", {"train": [_bridge_episode(s) for s in range(20)]}, shards=2)
    write_rlds_dataset(root, "fractal20220817_data", {"train": [_fractal_episode(s) for s in range(4)],
                                                      "val": [_fractal_episode(9)]}, version="0.1.0", shards=1)
    return root


def test_gripper_conversions():
    np.testing.assert_array_equal(binarize_gripper(np.array([1.0, 0.97, 0.5, 0.02, 0.6, 0.99])), [1, 1, 0, 0, 1, 1])
    # a trailing run of in-between values keeps the last raw value: OpenVLA's reverse scan starts from it
    np.testing.assert_array_equal(binarize_gripper(np.array([0.5, 0.5])), [0.5, 0.5])
    np.testing.assert_array_equal(binarize_gripper(np.array([0.02, 0.5, 0.75])), [0, 0.75, 0.75])
    # +1 closes, -1 opens; before the first command the gripper is in the opposite state
    np.testing.assert_array_equal(relative_to_absolute_gripper(np.array([0.0, 1.0, 0.0, -1.0])), [1, 0, 0, 1])
    np.testing.assert_array_equal(relative_to_absolute_gripper(np.array([0.0, -1.0, 0.0])), [0, 1, 1])
    np.testing.assert_array_equal(relative_to_absolute_gripper(np.zeros(3)), [1, 1, 1])


def test_bridge_standardisation(oxe_root):
    data = RLDSDataset.open(oxe_root, "bridge_orig")
    assert data.path.name == "1.0.0" and len(data.splits["train"]) == 2
    episode = next(data.episodes("train"))  # shard 0 holds episodes 0, 2, 4, ...
    raw = _bridge_episode(0)
    state = raw["steps/observation/state"].reshape(6, 7)
    # step 0 dropped, deltas relabelled from state, last step dropped: 4 steps remain
    assert episode.actions.shape == (4, 7) and episode.images.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(episode.actions[0, :6], state[2, :6] - state[1, :6], atol=1e-7)
    np.testing.assert_array_equal(episode.actions[:, 6], [1, 0, 0, 1])  # binarised 0.97, 0.5, 0.02, 0.6
    assert abs(int(episode.images[0].mean()) - 10) <= 2  # the JPEG of step 1
    assert episode.instruction == "put the spoon 0 in the pot"


def test_fractal_standardisation_and_stored_val_split(oxe_root):
    data = RLDSDataset.open(oxe_root, "fractal20220817_data")
    episodes = list(data.episodes("train"))
    assert len(episodes) == 4 and len(list(data.episodes("val"))) == 1  # a stored val split is used as is
    raw = _fractal_episode(1)
    np.testing.assert_allclose(episodes[1].actions[:, :3], raw["steps/action/world_vector"].reshape(4, 3))
    np.testing.assert_array_equal(episodes[1].actions[:, 6], [1, 0, 0, 1])
    assert episodes[1].instruction == "pick coke can"


def test_95_5_split_and_sharding_without_duplicates(oxe_root):
    data = RLDSDataset.open(oxe_root, "bridge_orig")
    assert data.shard_lengths("train") == [10, 10]
    train = [w for w, _ in data.episode_records("train")]
    val = [w for w, _ in data.episode_records("val")]
    assert len(train) == 19 and len(val) == 1  # round(0.95 * 20) = 19 by global index
    assert val == [f"{data.splits['train'][1]}, record 9"]
    ranks = [[w for w, _ in data.episode_records("train", rank=r, world_size=2)] for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(train) and not set(ranks[0]) & set(ranks[1])


def test_statistics_are_cached_by_content_hash(oxe_root, tmp_path):
    data = RLDSDataset.open(oxe_root, "fractal20220817_data")
    stats = data.action_statistics(cache_dir=tmp_path)
    actions = np.concatenate([e.actions for e in data.episodes("train")])
    np.testing.assert_allclose(stats["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-6)
    cached = list(tmp_path.glob("affordvla_action_stats_*.json"))
    assert [p.name for p in cached] == [f"affordvla_action_stats_{data.content_hash()}.json"]
    cached[0].write_text(cached[0].read_text().replace('"count": 16', '"count": -1'))
    assert data.action_statistics(cache_dir=tmp_path)["count"] == -1  # read back, not recomputed


def test_windows_clamp_and_mask():
    from affordvla.data.oxe import Episode

    episode = Episode(np.arange(4)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3).astype(np.uint8),
                      np.arange(4, dtype=np.float32)[:, None].repeat(7, 1), "x", "s")
    first, *_, last = list(episode_windows(episode, window_size=2, chunk_size=3))
    np.testing.assert_array_equal(first.frame_mask, [False, True])
    np.testing.assert_array_equal(first.action_mask, [[False] * 3, [True, True, True]])
    np.testing.assert_array_equal(last.actions[1, :, 0], [3, 3, 3])
    np.testing.assert_array_equal(last.action_mask[1], [True, False, False])


def test_mixtures(oxe_root):
    # OpenVLA's magic soup: 23 datasets (two of its 25 are disabled there for broken data)
    assert len(MIXTURES["oxe_magic_soup"]) == 23
    assert sum(w for _, w in MIXTURES["oxe_magic_soup"]) == pytest.approx(28.2 + 0.54087122203 + 0.8341046294)
    weights = mixture_weights("bridge_rt_1", {"bridge_orig", "fractal20220817_data"})
    assert weights == {"bridge_orig": 0.5, "fractal20220817_data": 0.5}
    with pytest.raises(ValueError, match="unknown mixture 'soup'; valid"):
        mixture_weights("soup", set())
    with pytest.raises(OXEFormatError, match=r"mixture datasets \['fractal20220817_data'\] are not under the data"):
        mixture_weights("bridge_rt_1", {"bridge_orig"})
    assert mixture_weights("bridge_rt_1", {"bridge_orig"}, allow_missing=True) == {"bridge_orig": 1.0}
    stream = stream_mixture(oxe_root, "bridge_rt_1", "train", window_size=2, chunk_size=2, shuffle_buffer=8)
    samples = [next(stream) for _ in range(40)]
    # bridge_orig's shards carry its TFDS name, bridge_dataset
    sources = {s.meta["source"].split("/")[-1].split("-")[0] for s in samples}
    assert sources == {"bridge_dataset", "fractal20220817_data"}
    assert all(s.actions.shape == (2, 2, 7) for s in samples)


def test_bad_dataset_folders(tmp_path):
    with pytest.raises(OXEFormatError, match="dataset bridge_orig: RLDS folder .* does not exist"):
        RLDSDataset.open(tmp_path, "bridge_orig")
    path = write_rlds_dataset(tmp_path, "bridge_orig", {"train": [_bridge_episode(0)]}, shards=2)
    write_records(path / "bridge_dataset-train.tfrecord-00001-of-00002", [b"\xff\xff not protobuf"])
    info = json.loads((path / "dataset_info.json").read_text())
    info["splits"][0]["shardLengths"] = ["1", "1"]
    (path / "dataset_info.json").write_text(json.dumps(info))
    data = RLDSDataset.open(tmp_path, "bridge_orig")
    # round(0.95 * 2) = 2: both records are training episodes
    with pytest.raises(TFRecordError, match=r"00001-of-00002, record 0: not a tf.train.Example"):
        list(data.episodes("train"))


def test_nan_actions_and_broken_episodes_raise_or_are_counted(tmp_path):
    bad = _fractal_episode(0)
    bad["steps/action/world_vector"][4] = np.nan  # step 1
    short = _fractal_episode(1)
    short["steps/action/rotation_delta"] = short["steps/action/rotation_delta"][:-1]
    write_rlds_dataset(tmp_path, "fractal20220817_data", {"val": [bad, short, _fractal_episode(2)]}, shards=1)
    data = RLDSDataset.open(tmp_path, "fractal20220817_data")
    with pytest.raises(OXEFormatError, match=r"00000-of-00001, record 0: dataset fractal20220817_data: NaN or "
                                             r"infinite actions at steps \[1\]"):
        list(data.episodes("val"))
    skipped = []
    kept = list(data.episodes("val", on_error="skip", skipped=skipped))
    assert len(kept) == 1 and [w.split(", ")[-1] for w in skipped] == ["record 0", "record 1"]
    write_rlds_dataset(tmp_path / "short", "fractal20220817_data", {"val": [short]}, shards=1)
    with pytest.raises(OXEFormatError, match=r"record 0: dataset fractal20220817_data: steps/action/rotation_delta "
                                             r"has 11 values, expected 4 steps"):
        list(RLDSDataset.open(tmp_path / "short", "fractal20220817_data").episodes("val"))


def test_loader_workers_and_ranks_read_disjoint_shards(tmp_path):
    from torch.utils.data import DataLoader

    from affordvla.data.oxe import OXEMixtureStream

    episodes = [_fractal_episode(s) for s in range(8)]
    for i, e in enumerate(episodes):
        e["steps/observation/natural_language_instruction"] = [f"episode {i}".encode()] * 4
    write_rlds_dataset(tmp_path, "fractal20220817_data", {"train": episodes, "val": episodes[:1]}, shards=4)

    def instructions(rank, workers):
        stream = OXEMixtureStream(tmp_path, "fractal", window_size=1, chunk_size=1, shuffle_buffer=1,
                                  rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda s: s)
        seen = set()
        for i, sample in enumerate(loader):
            seen.add(sample.instruction)
            if i >= 60:
                return seen

    # 2 ranks x 2 workers = 4 consumers (rank * 2 + worker) for 4 shards; shard k holds episodes k and k + 4
    rank0, rank1 = instructions(0, 2), instructions(1, 2)
    assert rank0 == {f"episode {i}" for i in (0, 4, 1, 5)}
    assert rank1 == {f"episode {i}" for i in (2, 6, 3, 7)}


def test_toy_bridge_reads_back_through_bridges_standardisation(tmp_path):
    """The generated bridge_orig folder is RLDS as the release stores it: the reader drops step 0, relabels the arm
    action from the state and binarises the gripper, which gives back the toy expert's moves and gripper
    commands exactly, and the JPEG frames the toy rendered."""
    from affordvla.offline.toy_actions import ToyActionSettings, generate_episode
    from affordvla.offline.toy_oxe import write_toy_bridge

    settings = ToyActionSettings(train_episodes=3, val_episodes=1, episode_length=8, seed=5)
    path = write_toy_bridge(tmp_path, settings)
    assert path == tmp_path / "bridge_orig" / "1.0.0"
    data = RLDSDataset.open(tmp_path, "bridge_orig")
    assert sorted(data.splits) == ["train", "val"]
    episode = next(data.episodes("train"))  # shard 0 holds episodes 0 and 2
    frames, instruction, _ = generate_episode(np.random.default_rng([5, 0]), 8, 1)
    position = np.array([frame["robot_obs"][:3] for frame in frames])
    assert episode.instruction == instruction and episode.actions.shape == (6, 7)
    np.testing.assert_allclose(episode.actions[:, :3], position[2:] - position[1:-1], atol=1e-6)
    np.testing.assert_array_equal(episode.actions[:, 3:6], 0)
    np.testing.assert_array_equal(episode.actions[:, 6], [frame["rel_actions"][6] > 0 for frame in frames[1:-1]])
    rendered = np.stack([frame["rgb_static"] for frame in frames[1:-1]]).astype(float)
    assert np.abs(episode.images.astype(float) - rendered).mean() < 3  # JPEG at quality 95
    assert len(list(data.episodes("val"))) == 1
    stamp = (path / "dataset_info.json").stat().st_mtime_ns
    write_toy_bridge(tmp_path, settings)  # complete and of the same settings: reused, not rewritten
    assert (path / "dataset_info.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="bridge's layout only.*fractal20220817_data"):
        write_toy_bridge(tmp_path / "other", settings, name="fractal20220817_data")


def test_oxe_bridge_config_trains_at_smoke_scale(tmp_path):
    """`dataset=oxe_bridge scale=smoke` writes the toy bridge fixture and trains through the TFRecord reader and
    the HDF5 episode cache like any experiment's smoke run."""
    from conftest import compose_train

    from affordvla.train import train

    cfg = compose_train(["experiment=toy_actions_mlp", "dataset=oxe_bridge", "scale=smoke", "logger=none",
                         f"paths.root_dir={tmp_path}"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["test/count"] == 2 and np.isfinite(metrics["val/action_mse"])
    assert list((tmp_path / "outputs" / "data" / "smoke").glob("oxe-*/bridge_orig/1.0.0"))
    assert list((tmp_path / "outputs" / "data" / "cache").glob("oxe_*.h5"))
