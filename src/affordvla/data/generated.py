"""Where generated data (toy datasets, smoke fixtures) may go: only the project's own data folder, in a folder named
by the generator's settings, so a user's data is never a generator's target.

A data module knows no generator: `dataset.generate` names one by `_target_` with `_partial_: true` and its
settings (the offline stand-ins in `affordvla.offline`), and the module calls it with the paths. Configs name
the folder with the `generated_name` resolver (`${paths.data_dir}/smoke/${generated_name:kalie,
${dataset.generate}}`), from the settings alone; a data module given `generate` checks that its `root` is such a
folder before any work (`check_generator`). The writers themselves refuse a folder holding anything they did not write
(`affordvla.locking.write_once`), the second guard.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from affordvla.locking import check_generator_owns


class GeneratedRootError(ValueError):
    """A data module was asked to generate data into a folder that is not a generated one."""


# Hydra's instantiation keys name the generator, not its settings: they stay out of a folder's name
_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def _container(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    raise TypeError(f"a generator setting must be a plain value, got {type(value).__name__}: {value!r}")


def plain_settings(settings: Any) -> Any:
    """`settings` as plain JSON values (a DictConfig resolved, at any depth), the form names and records are
    derived from."""
    return json.loads(json.dumps(_container(settings) if isinstance(settings, DictConfig) else settings,
                                 sort_keys=True, default=_container))


def generated_name(kind: str, settings: Mapping[str, Any] | None) -> str:
    """`<kind>-<12 hex digits of the settings>`: another setting is another folder, never a clash."""
    plain = plain_settings(settings)
    if isinstance(plain, dict):
        plain = {key: value for key, value in plain.items() if key not in _HYDRA_KEYS}
    text = json.dumps(plain, sort_keys=True)
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


def generator_parts(generate: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The generator function `dataset.generate` names and the settings it is given (a `_partial_: true` config
    instantiates to a `functools.partial`)."""
    if isinstance(generate, functools.partial) and not generate.args:
        return generate.func, dict(generate.keywords)
    if callable(generate) and not isinstance(generate, functools.partial):
        return generate, {}
    raise GeneratedRootError(
        f"dataset.generate must name the generator to call: `_target_: <function>` with `_partial_: true` and its "
        f"settings (e.g. _target_: affordvla.offline.toy_kalie.ensure_toy_kalie), or be null to read the data in "
        f"dataset.root; got {type(generate).__name__}: {generate!r}")


def check_generator(root: str | Path, kind: str, generate: Any) -> None:
    """`check_generated_root` for the generator `dataset.generate` names: its settings are its keyword-only
    parameters."""
    writer, settings = generator_parts(generate)
    check_generated_root(root, kind, settings, settings_of(writer))


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
