"""OmegaConf resolvers used by conf/ (registered on import of affordvla.train)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from affordvla.data.generated import generated_name


def project_root() -> str:
    """Where outputs go: $AFFORDVLA_ROOT, else the directory the command was started from (absolute, so the
    sqlite MLflow URI and every run agree on one store even when Hydra sweeps start jobs elsewhere)."""
    return str(Path(os.environ.get("AFFORDVLA_ROOT") or os.getcwd()).resolve())


if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", project_root)
if not OmegaConf.has_resolver("generated_name"):  # a generated dataset's folder, named by its settings
    OmegaConf.register_new_resolver("generated_name", generated_name)
