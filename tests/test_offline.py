"""The offline stand-ins reach the product only through config: data modules call the generator
`dataset.generate` names, the synthesis stage the writer `synthesis.tiny_models` names; folder names stay those
of the settings alone."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest
from conftest import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from affordvla.data.datamodule import KalieDataModule
from affordvla.data.generated import GeneratedRootError, generated_name, plain_settings
from affordvla.offline.toy_kalie import ensure_toy_kalie
from affordvla.synthesis.pipeline import build_recipe

# one composition per generated format: (overrides, the generator's module, the folder's kind)
FORMATS = {
    "toy_kalie": ([], "affordvla.offline.toy_kalie", "kalie"),
    "toy_actions": (["experiment=toy_actions_gpt"], "affordvla.offline.toy_actions", "calvin"),
    "kalie": (["experiment=kalie_ablations/aug_none", "scale=smoke"], "affordvla.offline.toy_kalie", "kalie"),
    "robopoint": (["experiment=robopoint_table2/llava_robopoint", "scale=smoke"], "affordvla.offline.toy_robopoint",
                  "robopoint"),
    "rlbench": (["experiment=llarva_rlbench/turn_tap", "scale=smoke"], "affordvla.offline.toy_rlbench", "rlbench"),
    "calvin": (["experiment=robovlms_calvin/llava_gpt_abc", "scale=smoke"], "affordvla.offline.toy_actions",
               "calvin"),
    "oxe": (["experiment=toy_actions_gpt", "dataset=oxe_bridge", "scale=smoke"], "affordvla.offline.toy_oxe", "oxe"),
    "oxe_mixture": (["experiment=toy_actions_gpt", "dataset=oxe_mixture", "scale=smoke"],
                    "affordvla.offline.toy_oxe", "oxe"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_generated_format_gets_its_offline_generator_from_config(fmt, tmp_path):
    overrides, module, kind = FORMATS[fmt]
    cfg = compose_train([*overrides, f"paths.root_dir={tmp_path}"], tmp_path / "run")
    data = instantiate(cfg.dataset)  # the constructor checks the root against the generator's settings
    assert isinstance(data.generate, functools.partial) and data.generate.func.__module__ == module
    settings = OmegaConf.to_container(cfg.dataset.generate, resolve=True)
    assert settings.pop("_target_").startswith(module + ".") and settings.pop("_partial_") is True
    # the folder is named from the settings alone, as before the generator was named in the config: the name
    # computed here by hand, sha256 of the sorted JSON of the plain settings
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    assert plain_settings(data.generate.keywords) == settings
    assert Path(cfg.dataset.root).name == f"{kind}-{digest}"


def test_generated_names_leave_hydras_keys_out():
    settings = {"seed": 0, "image_size": 64, "splits": {"train": 12, "val": 4, "test": 4}}
    named = {"_target_": "affordvla.offline.toy_kalie.ensure_toy_kalie", "_partial_": True, **settings}
    assert generated_name("kalie", named) == generated_name("kalie", settings)
    assert generated_name("kalie", OmegaConf.create(named)) == generated_name("kalie", settings)


def test_generate_null_reads_the_data_and_a_bare_mapping_is_refused(tmp_path):
    cfg = compose_train(["dataset=kalie", f"dataset.root={tmp_path}", "dataset.generate=null",
                         f"paths.root_dir={tmp_path}"], tmp_path / "run")
    assert cfg.dataset.generate is None
    settings = {"seed": 0, "image_size": 32, "splits": {"train": 2, "val": 1, "test": 1}}
    folder = tmp_path / generated_name("kalie", settings)
    with pytest.raises(GeneratedRootError, match=r"dataset.generate must name the generator.*_partial_: true.*null"):
        KalieDataModule(str(folder), generate=settings)
    data = KalieDataModule(str(folder), generate=functools.partial(ensure_toy_kalie, **settings))
    data.setup()
    assert {split: len(d) for split, d in data.splits.items()} == {"train": 2, "val": 1, "test": 1}


def test_synthesis_tiny_models_name_their_writer(tmp_path):
    bare = OmegaConf.create({"tiny_models": {"root": str(tmp_path), "names": ["sam"]}, "recipe": {}})
    with pytest.raises(ValueError, match="synthesis.tiny_models must name the writer.*_target_"):
        build_recipe(bare)
    cfg = compose_train(["synthesis=kalie", f"paths.root_dir={tmp_path}"], tmp_path / "run")
    assert cfg.synthesis.tiny_models._target_ == "affordvla.offline.tiny_synthesis.ensure_tiny_models"
