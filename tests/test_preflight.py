"""The pre-flight option check refuses no shipped config: every key of every instantiated entry of every option of
every group (and every experiment) is a parameter of its target."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train

from affordvla.preflight import check_options
from affordvla.train import CONFIG_DIR

GROUPS = ("backbone", "head", "module", "dataset", "trainer", "logger", "callbacks", "experiment", "scale", "debug")


def _options() -> list[tuple[str, str]]:
    found = []
    for group in GROUPS:
        for path in sorted((Path(CONFIG_DIR) / group).rglob("*.yaml")):
            option = path.relative_to(Path(CONFIG_DIR) / group).with_suffix("").as_posix()
            if option.startswith("pointing_recipe") or Path(option).name.startswith("_"):
                continue  # the backbone build recipes and the experiments' shared bases are not choices
            found.append((group, option, ()))
            if group == "experiment":  # as the tables run them at smoke scale
                found.append((group, option, ("scale=smoke",)))
    return found


@pytest.mark.parametrize("group,option,extra", _options())
def test_every_shipped_option_passes_the_option_check(group, option, extra, tmp_path):
    overrides = [f"{group}={option}", *extra, f"paths.root_dir={tmp_path}", "++backbone.pretrained=/a/checkpoint",
                 "++backbone.vision_tower=/a/tower", "++dataset.root=/some/data"]
    check_options(compose_train(overrides, tmp_path / "run"))


def test_a_mistyped_option_is_named_with_its_close_match(tmp_path):
    cfg = compose_train([f"paths.root_dir={tmp_path}", "+dataset.batchsize=3"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"dataset.batchsize is not an option of .*KalieDataModule; did you mean "
                                         r"dataset.batch_size\?"):
        check_options(cfg)
