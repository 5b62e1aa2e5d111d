"""Generated fixtures for the paper tables (toy RoboPoint + Where2Place, toy RLBench), KALIE's train subset of
originals, and the Where2Place scoring of the benchmark callback."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
from PIL import Image

from affordvla.data.generated import generated_name
from affordvla.data.robopoint import read_where2place
from affordvla.data.robopoint_datamodule import RoboPointDataModule, read_pointing_index
from affordvla.evaluation.where2place import load_mask
from affordvla.locking import ForeignContentError
from affordvla.offline.toy_kalie import ensure_toy_kalie
from affordvla.offline.toy_rlbench import generate_toy_rlbench, write_toy_rlbench
from affordvla.offline.toy_robopoint import ensure_toy_robopoint


@pytest.fixture(scope="module")
def toy_robopoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_robopoint")
    ensure_toy_robopoint(root / "robopoint_1432k.json", root / "images", root / "where2place", seed=3,
                         image_size=48, images=10, where2place=10, unseen_fraction=0.3)
    return root


def test_toy_robopoint_is_in_robopoints_and_where2places_formats(toy_robopoint):
    entries, left_out, skipped = read_pointing_index(toy_robopoint / "robopoint_1432k.json", toy_robopoint / "images")
    assert len(entries) >= 10 and not left_out and skipped == 0
    raw = json.loads((toy_robopoint / "robopoint_1432k.json").read_text())
    assert raw[0]["conversations"][0]["value"].startswith("<image>\n")
    assert raw[0]["conversations"][1]["value"].startswith("[(")
    assert all(1 <= len(e.points) <= 5 for e in entries)
    questions = read_where2place(toy_robopoint / "where2place")
    assert [q.category for q in questions] == ["seen"] * 7 + ["unseen"] * 3
    assert all("free space between" in q.text for q in questions if q.category == "unseen")
    assert not any("free space between" in e.instruction for e in entries)  # held out of training, as Where2Place (h)


def test_toy_robopoint_answers_lie_in_their_regions(toy_robopoint):
    """Object questions point at the object's pixels; free-space questions never at a named object."""
    entries, _, _ = read_pointing_index(toy_robopoint / "robopoint_1432k.json", toy_robopoint / "images")
    for entry in entries:
        image = np.asarray(Image.open(entry.image_path))
        pixels = np.floor(entry.points * image.shape[0]).astype(int)
        assert pixels.min() >= 0 and pixels.max() < image.shape[0]
    for question in read_where2place(toy_robopoint / "where2place"):
        assert (load_mask(question.mask_path) >= 0.5).sum() > 0


def test_toy_robopoint_is_reused_and_refuses_other_settings(toy_robopoint):
    before = (toy_robopoint / "robopoint_1432k.json").stat().st_mtime_ns
    ensure_toy_robopoint(toy_robopoint / "robopoint_1432k.json", toy_robopoint / "images",
                         toy_robopoint / "where2place", seed=3, image_size=48, images=10, where2place=10,
                         unseen_fraction=0.3)
    assert (toy_robopoint / "robopoint_1432k.json").stat().st_mtime_ns == before
    with pytest.raises(ForeignContentError, match="other parameters"):
        ensure_toy_robopoint(toy_robopoint / "robopoint_1432k.json", toy_robopoint / "images",
                             toy_robopoint / "where2place", seed=4, image_size=48, images=10, where2place=10)


def test_robopoint_datamodule_generates_on_first_use(tmp_path):
    settings = {"seed": 0, "image_size": 32, "images": 10, "where2place": 4}
    root = tmp_path / generated_name("robopoint", settings)
    data = RoboPointDataModule(json_path=str(root / "conv.json"), image_dir=str(root / "img"), root=str(root),
                               generate=partial(ensure_toy_robopoint, **settings))
    data.setup()
    assert len(data.splits["train"]) > 0 and len(data.splits["test"]) > 0
    assert len(read_where2place(root / "where2place")) == 4


def test_where2place_callback_scores_perfect_and_empty_answers(toy_robopoint):
    from affordvla.evaluation.benchmark_callbacks import Where2PlaceCallback
    from affordvla.formats.codecs import make_codec

    class Head:
        codec = make_codec("robopoint")

    callback = Where2PlaceCallback(str(toy_robopoint / "where2place"), output_dir="unused", mode="corrected")
    questions = read_where2place(toy_robopoint / "where2place")
    perfect = []
    for q in questions:  # an integer pixel (read as a pixel, not normalised) well inside each region
        rows, cols = np.nonzero(load_mask(q.mask_path) >= 0.99)
        perfect.append({"question_id": q.question_id, "text": f"[({cols[len(cols) // 2]}, {rows[len(rows) // 2]})]"})
    metrics = callback.score(perfect, Head())
    assert metrics["test/where2place"] == pytest.approx(100.0) and metrics["test/where2place_h"] == pytest.approx(100.0)
    empty = callback.score([{"question_id": q.question_id, "text": "no idea"} for q in questions], Head())
    assert empty["test/where2place"] == 0.0 and empty["test/where2place_parse_failure_rate"] == 1.0


def test_toy_rlbench_reads_as_llarva_actions(tmp_path):
    from affordvla.data.action_datamodule import ActionWindowDataModule

    settings = {"train_episodes": 2, "val_episodes": 1, "episode_length": 6, "image_size": 32}
    data = ActionWindowDataModule(source="rlbench", root=str(tmp_path / generated_name("rlbench", settings)),
                                  cameras=("front",), tasks=["open_drawer", "close_jar"], train_split="train",
                                  val_split="val", window_size=5, chunk_size=1, cache_dir=str(tmp_path / "cache"),
                                  generate=partial(generate_toy_rlbench, **settings))
    data.setup()
    meta = data.metadata()
    assert meta["tasks"] == ["open_drawer", "close_jar"] and meta["action_dim"] == 8 and meta["state_dim"] == 7
    sample = data.splits["train"][0]
    assert sample.images["front"].shape[1:] == (32, 32, 3)
    assert set(np.unique(sample.actions[..., -1])) <= {0.0, 1.0}  # gripper_open
    assert sample.instruction in ("open drawer", "close jar")


def test_toy_rlbench_adds_tasks_and_refuses_other_settings(tmp_path):
    from affordvla.data.rlbench import list_episodes

    write_toy_rlbench(tmp_path, ["turn_tap"], splits={"train": 1}, episode_length=4, image_size=16)
    first = (tmp_path / "train" / "turn_tap" / "all_variations" / "episodes" / "episode0" / "low_dim_obs.pkl")
    stamp = first.stat().st_mtime_ns
    write_toy_rlbench(tmp_path, ["turn_tap", "close_jar"], splits={"train": 1}, episode_length=4, image_size=16)
    assert first.stat().st_mtime_ns == stamp  # an existing task is reused
    (episode,) = list_episodes(tmp_path / "train" / "close_jar")
    observations = episode.demo().observations
    assert len(observations) == 4 and observations[0].gripper_open == 1.0 and observations[-1].gripper_open == 0.0
    velocities = observations[0].joint_velocities
    assert np.allclose(observations[1].joint_positions, observations[0].joint_positions + velocities)
    with pytest.raises(ForeignContentError, match="turn_tap"):
        write_toy_rlbench(tmp_path, ["turn_tap"], splits={"train": 2}, episode_length=4, image_size=16)


def test_kalie_train_subset_keeps_variants_with_their_originals(tmp_path):
    from affordvla.data.datamodule import KalieDataModule, original_subset
    from affordvla.data.kalie import KalieFormatError

    settings = {"seed": 0, "image_size": 32, "splits": {"train": 8, "val": 2, "test": 2}}
    root = tmp_path / generated_name("kalie", settings)
    plain = KalieDataModule(str(root), generate=partial(ensure_toy_kalie, **settings), max_train_samples=3,
                            train_subset_seed=1)
    plain.setup()
    assert len(plain.splits["train"]) == 3 and plain.metadata()["max_train_samples"] == 3
    again = KalieDataModule(str(root), max_train_samples=3, train_subset_seed=1)
    again.setup()
    assert [e.key for e in again.splits["train"].entries] == [e.key for e in plain.splits["train"].entries]
    # a synthesised folder: entries name their source in manifest.json; variants follow their original
    synthesised = tmp_path / "synth"
    synthesised.mkdir()
    records = {f"entry_{i}": {"source": f"src_{i // 3}", "variant": None if i % 3 == 0 else i % 3 - 1}
               for i in range(12)}
    (synthesised / "manifest.json").write_text(json.dumps({"entries": records}))
    keys = original_subset(synthesised, list(records), 2, seed=0)
    assert len(keys) == 6 and len({records[k]["source"] for k in keys}) == 2
    with pytest.raises(KalieFormatError, match="max_train_samples=5"):
        original_subset(synthesised, list(records), 5, seed=0)
