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

log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "training_state.pt"


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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    for key, original in json.loads(metadata.get("aliases", "{}")).items():
        tensors[key] = tensors[original]
    order = json.loads(metadata.get("order", "[]")) or list(tensors)
    return {key: tensors[key] for key in order}


class SafetensorsCheckpointIO(CheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        save_state_dict(checkpoint["state_dict"], tmp / WEIGHTS_NAME)
        torch.save(rest, tmp / STATE_NAME)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)  # a crash mid-save never leaves a half-written checkpoint under the real name

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        if not (path / WEIGHTS_NAME).is_file() or not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not an affordvla checkpoint (needs {WEIGHTS_NAME} and {STATE_NAME})")
        checkpoint = torch.load(path / STATE_NAME, map_location=map_location or "cpu", weights_only=True)
        checkpoint["state_dict"] = load_state_dict(path / WEIGHTS_NAME)
        return checkpoint

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
