"""The user's data is only ever read: generated data goes to the project's data folder under a name derived from
its settings, a folder holding anything else is never written, images are decoded before training starts, and
entries skipped with `dataset.on_error=skip` are counted in the run's records (MLflow included)."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_train
from data_formats import truncate, write_kalie_folder
from mlflow.tracking import MlflowClient

from affordvla.data.datamodule import KalieDataModule
from affordvla.data.generated import GeneratedRootError, generated_name
from affordvla.data.kalie import KalieFormatError
from affordvla.locking import ForeignContentError
from affordvla.offline.toy_kalie import ensure_toy_kalie


def tree_checksum(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_generated_folders_are_named_by_every_setting(tmp_path):
    small = {"seed": 0, "image_size": 64, "splits": {"train": 12, "val": 4, "test": 4}}
    assert generated_name("kalie", small) == generated_name("kalie", json.loads(json.dumps(small)))
    assert generated_name("kalie", small) != generated_name("kalie", small | {"image_size": 32})
    assert generated_name("kalie", small) != generated_name("kalie", small | {"splits": {"train": 40}})
    with pytest.raises(GeneratedRootError, match=r"dataset.root=.*kalie is not a generated-data folder"):
        KalieDataModule(str(tmp_path / "kalie"), generate=partial(ensure_toy_kalie, **small))
    with pytest.raises(GeneratedRootError, match=r"unknown setting\(s\) \['colour'\]"):
        KalieDataModule(str(tmp_path / generated_name("kalie", small | {"colour": 1})),
                        generate=partial(ensure_toy_kalie, **small, colour=1))


def test_a_generated_folder_with_a_users_file_is_refused_before_any_work(tmp_path):
    settings = {"seed": 0, "image_size": 32, "splits": {"train": 4, "val": 1, "test": 1}}
    folder = tmp_path / generated_name("kalie", settings)
    folder.mkdir()
    (folder / "data_jsonformat.json").write_text("{}")
    with pytest.raises(ForeignContentError, match="data_jsonformat.json"):
        KalieDataModule(str(folder), generate=partial(ensure_toy_kalie, **settings))
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no lock file beside it either


def test_a_truncated_png_is_found_at_setup_and_skipped_and_counted(tmp_path):
    data = write_kalie_folder(tmp_path / "kalie", entries=10)
    truncate(data / "imgs" / "entry_6.png")
    with pytest.raises(KalieFormatError, match=r"entry 'entry_6': image .*entry_6.png does not decode"):
        KalieDataModule(str(data)).setup()
    skipping = KalieDataModule(str(data), on_error="skip")
    skipping.setup()
    meta = skipping.metadata()
    assert meta["skipped"] == 1 and meta["preflight"] == {"checked": 10, "unreadable": 1, "sampled": False,
                                                          "skipped_entries": 1}
    kept = [e.key for split in ("train", "test") for e in skipping.splits[split].entries]
    assert sorted(kept) == sorted(f"entry_{i}" for i in range(10) if i != 6)
    # opt-out for huge sets: no decode at all, or a seeded sample of it
    unchecked = KalieDataModule(str(data), validate_images=False)
    unchecked.setup()
    assert unchecked.metadata()["preflight"] == {"checked": 0, "unreadable": 0}
    sampled = KalieDataModule(str(data), validate_sample=3, on_error="skip")
    sampled.setup()
    assert sampled.metadata()["preflight"]["checked"] == 3 and sampled.metadata()["preflight"]["sampled"]


def test_a_fixed_count_codec_is_refused_on_variable_count_data():
    from affordvla.heads.keypoint_text import KeypointTextHead

    with pytest.raises(ValueError, match=r"head.codec=paligemma_loc writes exactly 5 points .* varying number .*"
                                         r"head.codec=robopoint"):
        KeypointTextHead(codec="paligemma_loc").match_point_count(None)
    KeypointTextHead(codec="paligemma_loc").match_point_count(5)
    head = KeypointTextHead(codec="robopoint")
    head.match_point_count(None)
    head.match_point_count(5)
    assert head.codec.num_points == 5


def test_smoke_scale_reads_a_real_kalie_folder_and_logs_the_skipped_entries(tmp_path):
    """`scale=smoke dataset=kalie dataset.root=<real data> dataset.generate=null`: the user's data at smoke scale,
    the folder byte-identical afterwards, and the entry with a truncated image skipped and counted in MLflow."""
    from affordvla.train import train

    data = write_kalie_folder(tmp_path / "home" / "kalie", entries=12)
    truncate(data / "imgs" / "entry_2.png")
    before = tree_checksum(data.parent)
    cfg = compose_train(["scale=smoke", "dataset=kalie", f"dataset.root={data}", "dataset.generate=null",
                         "dataset.on_error=skip", f"paths.root_dir={tmp_path / 'project'}", "export_dir=null"],
                        tmp_path / "project" / "run")
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert tree_checksum(data.parent) == before
    client = MlflowClient(f"sqlite:///{tmp_path / 'project'}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-train").experiment_id])
    info = json.loads(Path(client.download_artifacts(run.info.run_id, "run/run_info.json", str(tmp_path))).read_text())
    assert info["dataset"]["root"] == str(data) and info["dataset"]["skipped"] == 1
    assert info["dataset"]["preflight"]["unreadable"] == 1 and sum(info["dataset"]["sizes"].values()) == 11 + 2
