"""dataset=robopoint: RoboPoint's conversation JSON served like KALIE (split by image, lazy images, HDF5 cache),
variable point counts scored as point sets, and a few training steps of the tiny LLaVA through the configs."""

import json

import numpy as np
import pytest
from conftest import FAST_POINTING_BUILD, compose_train
from PIL import Image

from affordvla.data.robopoint import (
    RoboPointFormatError,
    point_entry,
    pointing_samples,
    write_conversations,
)
from affordvla.data.robopoint_datamodule import RoboPointDataModule
from affordvla.formats.sample import KeypointSample
from affordvla.metrics.keypoints import UNPARSED_L2, KeypointEvaluator

NUM_IMAGES = 10


def _points(i):
    rng = np.random.default_rng(i)
    return np.round(rng.uniform(0.05, 0.95, (i % 3 + 1, 2)), 3)  # 1, 2 or 3 points, 3 decimals as RoboPoint


@pytest.fixture(scope="module")
def robopoint_root(tmp_path_factory):
    """scene/{i}.png with one pointing question each, plus a second entry on scene/0.png mixing text, box and
    pointing answers, and an id that repeats."""
    root = tmp_path_factory.mktemp("robopoint")
    for i in range(NUM_IMAGES):
        path = root / "images" / "scene" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
    entries = [point_entry(f"p{i}", f"scene/{i}.png", f"Point to free space near object {i}.", _points(i))
               for i in range(NUM_IMAGES)]
    entries.append({"id": "mixed", "image": "scene/0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the mug?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Find the mug box."}, {"from": "gpt", "value": "[(0.5, 0.5, 0.2, 0.1)]"},
        {"from": "human", "value": "Point at the handle."}, {"from": "gpt", "value": "[(0.250, 0.750)]"},
    ]})
    entries.append(point_entry("p3", "scene/3.png", "Point to the left of object 3.", np.array([[0.1, 0.2]])))
    write_conversations(root / "robopoint_1432k.json", entries)
    return root


def _targets(root):
    """Every pointing answer by entry key, straight from the reader (the hand-written truth)."""
    samples, _ = pointing_samples(root / "robopoint_1432k.json", root / "images")
    keys = [s.meta["entry"] for s in samples]
    keys[-1] = "p3#0~1"  # the repeated id
    return dict(zip(keys, samples))


def _module(root, **kwargs):
    return RoboPointDataModule(json_path=str(root / "robopoint_1432k.json"), image_dir=str(root / "images"),
                               root=str(root), batch_size=2, eval_batch_size=4, **kwargs)


def _set_error(pred, target):
    """Symmetric mean nearest-point distance, written out loop by loop."""
    forward = np.mean([min(np.hypot(*(p - t)) for t in target) for p in pred])
    backward = np.mean([min(np.hypot(*(p - t)) for p in pred) for t in target])
    return (forward + backward) / 2


def _baseline(dm, split):
    """The mean baseline by hand: one point at the mean of the training answers' centroids."""
    targets = _targets(dm.json_path.parent)
    mean = np.mean([targets[e.key].keypoints.mean(0) for e in dm.splits["train"].entries], axis=0)
    return np.mean([_set_error(mean[None], targets[e.key].keypoints) for e in dm.splits[split].entries])


def test_split_by_image_lazy_samples_and_metadata(robopoint_root):
    dm = _module(robopoint_root)
    dm.setup()
    targets = _targets(robopoint_root)
    train, val, test = (dm.splits[s] for s in ("train", "val", "test"))
    assert val is test and len(train) + len(val) == len(targets) == NUM_IMAGES + 2
    train_images = {e.image_path for e in train.entries}
    assert not train_images & {e.image_path for e in val.entries}  # questions on one image stay on one side
    assert len(train_images) == 8  # 80 % of the 10 images
    for split in (train, val):
        for index, entry in enumerate(split.entries):
            sample, expected = split[index], targets[entry.key]
            np.testing.assert_array_equal(sample.image, expected.image)
            np.testing.assert_allclose(sample.keypoints, expected.keypoints)
            assert sample.instruction == expected.instruction and sample.meta["point_set"] is True
            assert sample.point_names == expected.point_names
    assert not train._samples  # images are not kept unless asked (keep_in_memory)

    _, left_out = pointing_samples(robopoint_root / "robopoint_1432k.json", robopoint_root / "images")
    meta = dm.metadata()
    assert meta["left_out"] == dict(left_out) == {"text": 1, "box": 1}
    assert meta["sizes"] == {"train": len(train), "val": len(val), "test": len(val)} and meta["skipped"] == 0
    counts = [len(targets[e.key].keypoints) for e in train.entries]
    assert meta["points_per_answer"] == {"min": min(counts), "max": max(counts), "mean": pytest.approx(np.mean(counts))}
    json.dumps(meta)

    centroids = [targets[e.key].keypoints.mean(0) for e in train.entries]
    np.testing.assert_allclose(dm.train_keypoint_mean(), [np.mean(centroids, axis=0)], atol=1e-6)

    dm.collate = list
    limited = _module(robopoint_root, max_val_samples=1)
    limited.setup()
    limited.collate = list
    (batch,) = list(limited.val_dataloader())  # the limited view reads through the same loader
    assert [s.meta["entry"] for s in batch] == [val.entries[0].key]
    assert sum(len(b) for b in dm.train_dataloader()) == len(train) // 2 * 2


def test_hdf5_cache_gives_the_same_samples(robopoint_root, tmp_path):
    from affordvla.data.cli import main

    # a cache written ahead by the CLI (its samples lack the point-set flag) is read and completed
    out = tmp_path / "cache" / "robopoint_robopoint_1432k.h5"
    assert main(["convert", "robopoint", str(robopoint_root / "robopoint_1432k.json"), str(out),
                 "--images", str(robopoint_root / "images")]) == 0
    cached = _module(robopoint_root, cache_dir=str(tmp_path / "cache"))
    cached.setup()
    plain = _module(robopoint_root)
    plain.setup()
    for split in ("train", "val"):
        for index in range(len(plain.splits[split])):
            a, b = cached.splits[split][index], plain.splits[split][index]
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_allclose(a.keypoints, b.keypoints)
            assert a.meta["entry"] == b.meta["entry"] and a.meta["point_set"] is True


def test_bad_input_is_explained(robopoint_root, tmp_path):
    entries = json.loads((robopoint_root / "robopoint_1432k.json").read_text())
    entries[4]["image"] = "scene/missing.png"
    path = write_conversations(tmp_path / "broken.json", entries)
    with pytest.raises(RoboPointFormatError, match=r"broken.json, entry 'p4': image .*missing.png does not exist"):
        RoboPointDataModule(str(path), str(robopoint_root / "images")).setup()
    skipping = RoboPointDataModule(str(path), str(robopoint_root / "images"), on_error="skip")
    skipping.setup()
    assert skipping.metadata()["skipped"] == 1 and sum(len(skipping.splits[s]) for s in ("train", "val")) == 11
    text_only = write_conversations(tmp_path / "text.json", [entries[-2] | {"conversations": entries[-2][
        "conversations"][:2]}])
    with pytest.raises(RoboPointFormatError, match=r"text.json: no pointing answers .*'text': 1"):
        RoboPointDataModule(str(text_only), str(robopoint_root / "images")).setup()
    with pytest.raises(FileNotFoundError, match=r"nothing.json does not exist \(dataset.json_path"):
        RoboPointDataModule(str(tmp_path / "nothing.json"), str(robopoint_root / "images")).setup()


def test_point_sets_are_scored_by_nearest_points():
    image = np.zeros((4, 4, 3), np.uint8)
    target = np.array([[0.2, 0.2], [0.6, 0.2], [0.6, 0.8]])
    sample = KeypointSample(image=image, instruction="q", keypoints=target, point_names=("a", "b", "c"),
                            meta={"point_set": True})
    mean = np.array([[0.5, 0.5]])
    evaluator = KeypointEvaluator(mean_keypoints=mean)
    one_point = np.array([[0.6, 0.3]])  # fewer points than the answer: scored, not a failure
    shuffled = target[::-1].copy()  # the same set in another order: error 0
    evaluator.add([sample, sample, sample], ["", "", ""], [one_point, shuffled, None])
    metrics = evaluator.compute()
    expected = [_set_error(one_point, target), 0.0, UNPARSED_L2]
    assert metrics["keypoint_error"] == pytest.approx(np.mean(expected))
    assert metrics["keypoint_error_parsed"] == pytest.approx(np.mean(expected[:2]))
    assert metrics["parse_failure_rate"] == pytest.approx(1 / 3)
    assert metrics["point_set_precision_error"] == pytest.approx(0.1 / 2)  # 0.1 for the one point, 0 for the set
    assert metrics["mean_baseline_error"] == pytest.approx(_set_error(mean, target))
    assert "kalie_corrected/avg_mse" not in metrics and "kalie_compat/avg_mse" not in metrics  # named points only


def test_robopoint_experiment_trains_on_the_fixture(robopoint_root, tmp_path):
    from affordvla.train import train

    overrides = ["experiment=robopoint_llava_tiny", f"dataset.root={robopoint_root}", f"paths.root_dir={tmp_path}",
                 "backbone.build.image_size=32", "backbone.build.patch_size=8", "backbone.build.hidden_size=32",
                 "backbone.build.vision_layers=2", "backbone.build.text_layers=2", *FAST_POINTING_BUILD,
                 "dataset.num_workers=0",
                 "dataset.batch_size=2", "dataset.eval_batch_size=4", "head.max_new_tokens=40", "logger=none",
                 "callbacks.progress_bar.refresh_rate=0", "trainer.max_steps=3", "trainer.val_check_interval=3",
                 "callbacks.model_checkpoint.every_n_train_steps=3"]
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.head.codec == "robopoint" and cfg.backbone.family == "llava"
    metrics = train(cfg)
    for name in ("train/loss", "val/keypoint_error", "val/mean_baseline_error", "test/keypoint_error"):
        assert np.isfinite(metrics[name]), name
    assert 0.0 <= metrics["test/parse_failure_rate"] <= 1.0
    dm = _module(robopoint_root)
    dm.setup()
    assert metrics["test/num_samples"] == len(dm.splits["test"])
    assert metrics["test/mean_baseline_error"] == pytest.approx(_baseline(dm, "test"), abs=1e-5)
    saved = json.loads((tmp_path / "run" / "model" / "dataset_metadata.json").read_text())
    assert saved["left_out"] == {"text": 1, "box": 1}
