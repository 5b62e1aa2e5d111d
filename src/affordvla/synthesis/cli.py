"""affordvla-synthesize: the synthesis stage as a Hydra app (conf/synthesize.yaml), outside training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import affordvla.resolvers  # noqa: F401  (registers ${project_root:})
from affordvla.cli import failures_reported
from affordvla.paths import CONFIG_DIR

log = logging.getLogger("affordvla.synthesize")


def synthesize(cfg: DictConfig) -> Path:
    """Prepare the dataset group's data and run the synthesis group on it; returns the output folder."""
    from affordvla.synthesis.pipeline import synthesize_from_config

    if cfg.synthesis.get("recipe") is None:
        raise ValueError(f"synthesis={cfg.synthesis.get('name')} has no recipe; choose one, e.g. "
                         "synthesis=kalie_compositing or synthesis=kalie")
    datamodule = instantiate(cfg.dataset)
    if not hasattr(datamodule, "root"):
        raise ValueError(f"dataset {cfg.dataset.get('name')!r} is not a KALIE-format keypoint dataset")
    datamodule.prepare_data()  # writes the generated toy dataset on first use
    result = synthesize_from_config(cfg.synthesis, datamodule.root,
                                    split_seed=getattr(datamodule, "split_seed", 2023),
                                    train_fraction=getattr(datamodule, "train_fraction", 0.8))
    log.info("synthesised dataset: %s", json.dumps({
        "root": str(result.root), "originals": result.originals, "synthetic": result.synthetic,
        "written_now": result.written, "seconds": round(result.seconds, 2)}))
    return result.root


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="synthesize")
def main(cfg: DictConfig) -> None:
    with failures_reported("affordvla-synthesize"):
        OmegaConf.resolve(cfg)
        synthesize(cfg)


if __name__ == "__main__":
    main()
