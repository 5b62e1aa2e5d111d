"""Checkpoints as a directory: weights in safetensors, training state beside them, nothing unpickled on load.

Lightning hands a checkpoint dict to `SafetensorsCheckpointIO`; the tensors of its `state_dict` go to
`model.safetensors` and everything else (optimizer, schedulers, loop progress, callback and RNG state) to
`training_state.pt`, read back with `torch.load(weights_only=True)`. `ckpt_path=<dir>` resumes exactly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from affordvla.weight_files import WeightFileError, check_keys_match, safetensors_header, safetensors_shapes

log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "training_state.pt"
PARTIAL_SUFFIX = ".partial"


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors refuses tensors that share storage (tied embeddings): store each once plus an alias map."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for key, tensor in state_dict.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            aliases[key] = seen[identity]
        else:
            seen[identity] = key
            unique[key] = tensor.detach().contiguous()
    save_file(unique, str(path), metadata={"aliases": json.dumps(aliases), "order": json.dumps(list(state_dict))})


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    metadata = safetensors_header(path).get("__metadata__") or {}  # names the file if truncated or corrupt
    tensors = load_file(str(path))
    for key, original in json.loads(metadata.get("aliases", "{}")).items():
        tensors[key] = tensors[original]
    order = json.loads(metadata.get("order", "[]")) or list(tensors)
    return {key: tensors[key] for key in order}


def check_checkpoint_dir(path: str | Path, option: str = "ckpt_path") -> Path:
    """A checkpoint directory as `SafetensorsCheckpointIO` writes it, checked without reading its tensors: the
    error names the option and the path and says what is wrong (missing, a file, a partial save, incomplete,
    corrupt weights)."""
    path = Path(path)
    expected = f"a checkpoint directory written by affordvla-train (<run>/checkpoints/step_NNNNNN with " \
               f"{WEIGHTS_NAME} and {STATE_NAME})"
    if path.name.endswith(PARTIAL_SUFFIX):
        complete = sorted(p.name for p in path.parent.glob("step_*") if not p.name.endswith(PARTIAL_SUFFIX))
        latest = f"; the latest complete one there is {path.parent / complete[-1]}" if complete else ""
        raise ValueError(f"{option}={path} is a partial checkpoint: the run stopped while writing it, so it is "
                         f"incomplete{latest}")
    if not path.exists():
        raise FileNotFoundError(f"{option}={path} does not exist; expected {expected}")
    if not path.is_dir():
        raise ValueError(f"{option}={path} is a file; expected {expected}")
    absent = [name for name in (WEIGHTS_NAME, STATE_NAME) if not (path / name).is_file()]
    if absent:
        raise ValueError(f"{option}={path} is not a complete checkpoint: {' and '.join(absent)} missing; "
                         f"expected {expected}")
    try:
        safetensors_header(path / WEIGHTS_NAME)
    except WeightFileError as exc:
        raise WeightFileError(f"{option}={path}: {exc}") from None
    return path


def check_checkpoint_matches(path: str | Path, module: torch.nn.Module, option: str = "ckpt_path") -> None:
    """The checkpoint holds this module's weights (key for key), read from the file's header only: a checkpoint
    of another backbone family or head fails here with the key counts, not inside Lightning's strict load."""
    weights = Path(path) / WEIGHTS_NAME
    try:
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        family = getattr(getattr(module, "backbone", None), "family", "?")
        check_keys_match(safetensors_shapes(weights), expected, weights,
                         f"the weights of {type(module).__name__} on a {family} backbone as this config builds it")
    except WeightFileError as exc:
        raise WeightFileError(f"{option}={path}: {exc}") from None


def read_checkpoint(path: str | Path, map_location=None, option: str = "ckpt_path") -> dict[str, Any]:
    """Load a checkpoint directory (training state and weights), with errors that name the file."""
    path = check_checkpoint_dir(path, option)
    try:
        checkpoint = torch.load(path / STATE_NAME, map_location=map_location or "cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, or a pickle with objects weights_only refuses
        raise WeightFileError(f"{option}={path}: {path / STATE_NAME} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is corrupt or was not "
                              "written by affordvla-train") from None
    checkpoint["state_dict"] = load_state_dict(path / WEIGHTS_NAME)
    return checkpoint


class SafetensorsCheckpointIO(CheckpointIO):
    """Checkpoint folders of safetensors weights and a tensors-only training state. Given the module, a checkpoint
    is checked to hold its weights (key for key) before Lightning's strict load would fail on it."""

    def __init__(self, module: torch.nn.Module | None = None):
        super().__init__()
        self.module = module

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + PARTIAL_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        save_state_dict(checkpoint["state_dict"], tmp / WEIGHTS_NAME)
        torch.save(rest, tmp / STATE_NAME)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)  # a crash mid-save never leaves a half-written checkpoint under the real name

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if self.module is not None:
            check_checkpoint_matches(path, self.module)
        return read_checkpoint(path, map_location)

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)


class DirectoryModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint writing `step_000100/` directories instead of `.ckpt` files.

    A resumed run writes its checkpoints into its own run folder (run_info.json names the parent's). The parent
    folder's bookkeeping (its best and last checkpoints) is not carried over, so nothing there is ever pruned by
    the new run; Lightning warns "dirpath has changed" about exactly that, which is intended here."""

    FILE_EXTENSION = ""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parent = state_dict.get("dirpath", self.dirpath)
        if parent == self.dirpath:
            super().load_state_dict(state_dict)
            return
        log.info("resumed from a checkpoint of %s: this run's checkpoints go to %s", parent, self.dirpath)
        self.best_model_path = state_dict["best_model_path"]


class RNGStateCallback(L.Callback):
    """Saves and restores the Python, NumPy and torch generators with every checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "python": json.dumps(random.getstate()),
            "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = json.loads(state["python"])
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
