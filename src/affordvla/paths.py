"""Where the package finds its Hydra configs: one place for every command that composes them."""

from __future__ import annotations

import os
from pathlib import Path

# $AFFORDVLA_CONFIG_DIR, else conf/ of the checkout this package is installed from (editable install)
CONFIG_DIR = os.environ.get("AFFORDVLA_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))
