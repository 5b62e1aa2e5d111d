"""Bad-input corpus, data formats: datasets a user points the commands at, each laid out by hand as the original
tool writes it (KALIE's hdf5_to_json, RoboPoint's LLaVA conversation file, CALVIN's and RLBench's folders) and
then broken the way real folders break. Every case fails before any training with a message naming the file,
entry or option, and leaves the user's folder byte-identical (the harness compares checksums)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_formats import truncate, write_calvin_split, write_kalie_folder, write_robopoint_folder

from .conftest import assert_clear_failure


def train(workspace, *overrides: str):
    return workspace.run("affordvla-train", *overrides)


# --- generated data never lands in the user's folder (issue item 1) -------------------------------------------
@pytest.mark.parametrize("scale", ["debug=smoke", "scale=smoke"])
def test_smoke_run_on_a_real_kalie_folder_leaves_it_byte_identical(workspace, scale, tiny_backbone_dir):
    """`debug=smoke dataset=kalie dataset.root=<the user's data>` used to write the toy dataset into it. Now the
    folder stays byte-identical, and the run either reads the data at smoke scale or is refused, naming the
    override to drop (and the one that reads the data instead). The backbone is a prebuilt tiny one, so a run that
    trains never builds one."""
    data = write_kalie_folder(workspace.user("kalie"), entries=30)
    workspace.watch(data.parent)  # the folder and its siblings (no `kalie.lock` beside it either)
    result = train(workspace, "dataset=kalie", f"dataset.root={data}", scale,
                   f"backbone.pretrained={tiny_backbone_dir}", "backbone.build=null")
    if result.returncode != 0:
        assert_clear_failure(workspace, result, f"dataset.root={data}", "dataset.generate=null",
                             created=(data.parent / "kalie.lock",))
        return
    assert not workspace.unchanged(), workspace.unchanged()
    (run_info,) = (workspace.project / "outputs" / "runs").rglob("run_info.json")  # (MLflow keeps a copy too)
    assert json.loads(run_info.read_text())["dataset"]["root"] == str(data)


def test_generated_folder_with_a_users_file_is_not_written(workspace):
    """A user's file inside the project's generated folder: the generator does not write around it."""
    from hydra import compose, initialize_config_dir

    from affordvla.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=smoke", f"paths.root_dir={workspace.project}"])
    folder = Path(cfg.dataset.root)  # where `affordvla-train debug=smoke` generates its data
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    workspace.watch(folder)
    result = train(workspace, "debug=smoke")
    assert_clear_failure(workspace, result, str(folder), "notes.txt")


def test_unknown_generator_setting_is_named(workspace):
    result = train(workspace, "dataset=toy_actions", "+dataset.generate.episodes=3", "experiment=toy_actions_lstm")
    assert_clear_failure(workspace, result, "dataset.generate", "episodes", "train_episodes")


# --- KALIE -----------------------------------------------------------------------------------------------------
def test_kalie_root_that_does_not_exist(workspace):
    missing = workspace.home / "kalie_data"
    result = train(workspace, "dataset=kalie", f"dataset.root={missing}")
    assert_clear_failure(workspace, result, str(missing), "dataset.root", "data_jsonformat.json", created=(missing,))


def test_kalie_folder_without_its_index(workspace):
    data = write_kalie_folder(workspace.user("kalie"))
    (data / "data_jsonformat.json").unlink()
    workspace.watch(data)
    result = train(workspace, "dataset=kalie", f"dataset.root={data}")
    assert_clear_failure(workspace, result, str(data / "data_jsonformat.json"), "imgs/")


def test_robopoint_folder_given_as_kalie(workspace):
    """Wrong layout: the message shows what the folder holds instead."""
    data = write_robopoint_folder(workspace.user("robopoint"))
    workspace.watch(data)
    result = train(workspace, "dataset=kalie", f"dataset.root={data}")
    assert_clear_failure(workspace, result, "data_jsonformat.json", "robopoint_1432k.json")


def test_kalie_index_with_malformed_json(workspace):
    data = write_kalie_folder(workspace.user("kalie"))
    index = data / "data_jsonformat.json"
    index.write_text(index.read_text()[:200])
    workspace.watch(data)
    result = train(workspace, "dataset=kalie", f"dataset.root={data}")
    assert_clear_failure(workspace, result, str(index), "invalid JSON", "line")


def test_kalie_entry_with_a_misnamed_point(workspace):
    data = write_kalie_folder(workspace.user("kalie"))
    index = data / "data_jsonformat.json"
    entries = json.loads(index.read_text())
    points = json.loads(entries["entry_3"]["points"])
    points["Target"] = points.pop("Target Point")
    entries["entry_3"]["points"] = json.dumps(points, indent=4)
    index.write_text(json.dumps(entries, indent=4))
    workspace.watch(data)
    result = train(workspace, "dataset=kalie", f"dataset.root={data}")
    assert_clear_failure(workspace, result, str(index), "'entry_3'", "Target Point")


def test_kalie_truncated_png_is_found_before_training(workspace):
    """Found at start-up by the pre-flight decode, not at step 11; the message says how to skip it."""
    data = write_kalie_folder(workspace.user("kalie"))
    truncate(data / "imgs" / "entry_4.png")
    workspace.watch(data)
    result = train(workspace, "dataset=kalie", f"dataset.root={data}", "scale=smoke", "dataset.generate=null")
    assert_clear_failure(workspace, result, "'entry_4'", str(data / "imgs" / "entry_4.png"), "dataset.on_error=skip")
    assert "train/loss" not in result.output


def test_kalie_on_error_typo(workspace):
    data = write_kalie_folder(workspace.user("kalie"))
    workspace.watch(data)
    result = train(workspace, "dataset=kalie", f"dataset.root={data}", "dataset.on_error=ignore")
    assert_clear_failure(workspace, result, "dataset.on_error", "ignore", "skip")


# --- RoboPoint -------------------------------------------------------------------------------------------------
def test_robopoint_folder_without_the_conversation_file(workspace):
    data = write_robopoint_folder(workspace.user("robopoint"))
    (data / "robopoint_1432k.json").rename(data / "conversations.json")
    workspace.watch(data)
    result = train(workspace, "dataset=robopoint", f"dataset.root={data}", "head.codec=robopoint")
    assert_clear_failure(workspace, result, str(data / "robopoint_1432k.json"), "dataset.json_path",
                         "conversations.json")


def test_robopoint_without_its_image_folder(workspace):
    data = write_robopoint_folder(workspace.user("robopoint"))
    (data / "images").rename(data / "imgs")
    workspace.watch(data)
    result = train(workspace, "dataset=robopoint", f"dataset.root={data}", "head.codec=robopoint")
    assert_clear_failure(workspace, result, str(data / "images"), "dataset.image_dir")


def test_robopoint_conversation_file_with_malformed_json(workspace):
    data = write_robopoint_folder(workspace.user("robopoint"))
    conversations = data / "robopoint_1432k.json"
    conversations.write_text(conversations.read_text()[:-5])
    workspace.watch(data)
    result = train(workspace, "dataset=robopoint", f"dataset.root={data}", "head.codec=robopoint")
    assert_clear_failure(workspace, result, str(conversations), "invalid JSON")


def test_robopoint_smoke_with_the_default_keypoint_codec_is_refused_at_setup(workspace):
    """`dataset=robopoint scale=smoke` with the default backbone: its codec writes KALIE's five named points, and
    RoboPoint's answers hold any number; refused with the codec to use, not by the data loader mid-batch."""
    result = train(workspace, "dataset=robopoint", "scale=smoke")
    assert_clear_failure(workspace, result, "head.codec=paligemma_loc", "head.codec=robopoint")
    assert "train/loss" not in result.output


# --- CALVIN and RLBench ----------------------------------------------------------------------------------------
def test_calvin_dataset_without_its_validation_split(workspace):
    data = workspace.user("task_D_D")
    write_calvin_split(data / "training")
    workspace.watch(data)
    result = train(workspace, "experiment=toy_actions_lstm", "dataset=calvin", f"dataset.root={data}")
    assert_clear_failure(workspace, result, str(data / "validation"), "dataset.val_split")


def test_calvin_split_without_language_annotations(workspace):
    data = workspace.user("task_D_D")
    write_calvin_split(data / "training", annotations=False)
    write_calvin_split(data / "validation")
    workspace.watch(data)
    result = train(workspace, "experiment=toy_actions_lstm", "dataset=calvin", f"dataset.root={data}")
    assert_clear_failure(workspace, result, str(data / "training" / "lang_annotations" / "auto_lang_ann.npy"),
                         "dataset.train_split")


def test_rlbench_task_missing_from_a_split(workspace):
    data = workspace.user("rlbench")
    for split in ("train", "val"):
        (data / split / "open_drawer" / "all_variations" / "episodes" / "episode0").mkdir(parents=True)
    workspace.watch(data)
    result = train(workspace, "experiment=toy_actions_lstm", "dataset=rlbench", f"dataset.root={data}",
                   "dataset.tasks=[open_drawer,close_jar]", "dataset.cameras=[front]")
    assert_clear_failure(workspace, result, "close_jar", str(data / "train"))


# --- affordvla-data --------------------------------------------------------------------------------------------
def test_hdf5_conversion_into_an_existing_dataset_folder(workspace):
    """kalie-from-hdf5 used to replace data_jsonformat.json in a folder that already held a dataset."""
    collection = workspace.user("collection")
    (collection / "trash_sweeping").mkdir()
    data = write_kalie_folder(workspace.user("kalie"))
    workspace.watch(data, collection)
    result = workspace.run("affordvla-data", "kalie-from-hdf5", str(collection), str(data))
    assert_clear_failure(workspace, result, str(data), "out_dir")


def test_cache_conversion_of_a_folder_without_a_kalie_index(workspace):
    data = write_robopoint_folder(workspace.user("robopoint"))
    out = workspace.project / "outputs" / "cache.h5"
    workspace.watch(data)
    result = workspace.run("affordvla-data", "convert", "kalie", str(data), str(out))
    assert_clear_failure(workspace, result, str(data / "data_jsonformat.json"), created=(out,))
