"""Where generated data (toy datasets, smoke fixtures) may go: only the project's own data folder, in a folder named
by the generator's settings, so a user's data is never a generator's target.

Configs name such a folder with the `generated_name` resolver (`${paths.data_dir}/smoke/${generated_name:kalie,
${dataset.generate}}`); a data module given `generate` checks that its `root` is such a folder before any work
(`check_generated_root`). The writers themselves refuse a folder holding anything they did not write
(`affordvla.locking.write_once`), the second guard.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from affordvla.locking import check_generator_owns


class GeneratedRootError(ValueError):
    """A data module was asked to generate data into a folder that is not a generated one."""


def plain_settings(settings: Any) -> Any:
    """`settings` as plain JSON values (a DictConfig resolved), the form names and records are derived from."""
    if isinstance(settings, DictConfig):
        settings = OmegaConf.to_container(settings, resolve=True)
    return json.loads(json.dumps(settings, sort_keys=True))


def generated_name(kind: str, settings: Mapping[str, Any] | None) -> str:
    """`<kind>-<12 hex digits of the settings>`: another setting is another folder, never a clash."""
    text = json.dumps(plain_settings(settings), sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def check_generated_root(root: str | Path, kind: str, settings: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse to generate into `root` unless it is named by these settings (as the configs name generated
    folders): a `dataset.root` given by hand together with `dataset.generate` names the user's own folder. Then
    `settings` may only hold the generator's `allowed` keys, and `root` nothing the generator did not write."""
    expected = generated_name(kind, settings)
    if Path(root).name != expected:
        raise GeneratedRootError(
            f"dataset.root={root} is not a generated-data folder, but dataset.generate is set (by the dataset "
            f"config, scale=smoke or debug=smoke), which writes generated data, and only to the project's data "
            f"folder under a name derived from its settings ({expected}). Drop the dataset.root={root} override to "
            f"use the generated data, or add dataset.generate=null to read the data in {root}")
    unknown = sorted(set(plain_settings(settings)) - set(allowed))
    if unknown:
        raise GeneratedRootError(f"dataset.generate has unknown setting(s) {unknown}; the {kind} generator takes "
                                 f"{sorted(allowed)}")
    check_generator_owns(root, writing=False)  # a folder of a user's files: refused now, not after a model is built


def settings_of(writer: Callable[..., Any]) -> list[str]:
    """The settings a generator function takes: its keyword-only parameters (the paths come first)."""
    return [n for n, p in inspect.signature(writer).parameters.items() if p.kind is p.KEYWORD_ONLY]


def check_inside(root: str | Path, *paths: str | Path) -> None:
    """Generated data has one folder: every path the generator writes must lie inside `root`."""
    base = Path(root).resolve()
    for path in paths:
        if not Path(path).resolve().is_relative_to(base):
            raise GeneratedRootError(f"{path} lies outside the generated-data folder {root}; the generator writes "
                                     "nowhere else: drop the override that moved it")
