"""The `affordvla-serve` command: conf/serve.yaml, overridable from the command line like every Hydra command."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from affordvla.cli import failures_reported
from affordvla.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    with failures_reported("affordvla-serve"):
        from affordvla.serve.server import serve, settings_from_config

        serve(settings_from_config(cfg))


if __name__ == "__main__":
    main()
