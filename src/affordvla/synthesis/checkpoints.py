"""How the synthesis stage's model-backed parts load a local checkpoint directory (real weights or an offline
stand-in alike): a missing or broken checkpoint stops with an error naming the directory and the file; nothing is
fetched from a model hub."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(RuntimeError):
    """A local checkpoint directory is missing, incomplete or unreadable."""


def checkpoint_dir(path: str | Path | None, what: str, required: tuple[str, ...] = ("config.json",)) -> Path:
    """`path` as a Path after checking it is a directory holding `required` files; `what` names the model."""
    if path is None or str(path) == "":
        raise CheckpointError(f"{what}: no checkpoint directory given (set it in the synthesis config)")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{what}: checkpoint directory {path} does not exist (only local directories are "
                              "loaded; no model hub is contacted)")
    for name in required:
        if not (path / name).is_file():
            raise CheckpointError(f"{what}: {path / name} is missing; is {path} a {what} checkpoint directory?")
    return path


def load_or_explain(what: str, path: Path, loader, *args, **kwargs):
    """Call `loader(path, *args, **kwargs)`, turning a failure into a CheckpointError that names the directory."""
    try:
        return loader(str(path), *args, local_files_only=True, **kwargs)
    except CheckpointError:
        raise
    except Exception as error:  # a broken file surfaces as many exception types; name the checkpoint for all
        raise CheckpointError(f"{what}: could not load {path}: {type(error).__name__}: {error}") from error


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
