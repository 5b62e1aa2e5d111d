"""Reading weight files with errors that name the file and say what is wrong with it.

safetensors' own errors ("HeaderTooLarge", "MetadataIncompleteBuffer") name no file, and a state dict of another
model fails with hundreds of key names. The checks here read only a file's header (a few kilobytes, whatever
the size of the weights), so every weight file a command will read can be checked before any work starts.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# the format's own bound on the JSON header; larger means the file is not safetensors
MAX_HEADER_BYTES = 100_000_000
SHOWN_KEYS = 3


class WeightFileError(ValueError):
    """A weight file is missing, truncated, corrupt or holds the weights of another model."""


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; `__metadata__`),
    checked against the file's size, so a truncated or corrupt file is refused before any tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightFileError(f"{path} is corrupt: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise WeightFileError(f"{path} is corrupt or truncated: its header claims {length} bytes, the file has "
                                  f"{size}; not a complete safetensors file")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightFileError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path} is corrupt: its safetensors header is not a table of tensors")
    end = max((entry["data_offsets"][1] for key, entry in header.items()
               if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if 8 + length + end > size:
        raise WeightFileError(f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size} "
                              "(an interrupted copy or download?)")
    return header


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The state-dict keys a file written by `checkpointing.save_state_dict` (or any safetensors file) holds,
    with their shapes: its tensors plus the aliases of tied tensors stored once."""
    header = safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    shapes = {key: tuple(entry.get("shape", ())) for key, entry in header.items() if key != "__metadata__"}
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
    except json.JSONDecodeError:
        raise WeightFileError(f"{path} is corrupt: its alias table is not valid JSON") from None
    return shapes | {key: shapes[original] for key, original in aliases.items() if original in shapes}


def check_weight_directory(directory: str | Path) -> list[Path]:
    """Check the header of every safetensors file of a checkpoint directory (sharded or not, with its index);
    returns the files."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise WeightFileError(f"{index} is corrupt: expected JSON with a 'weight_map' of tensor -> shard") from None
        missing = sorted(name for name in shards if not (directory / name).is_file())
        if missing:
            raise WeightFileError(f"{index} names shards that are not in {directory}: {missing[:SHOWN_KEYS]}")
    for path in files:
        safetensors_header(path)
    return files


def check_keys_match(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                     source: str | Path, wanted: str) -> None:
    """Refuse weights whose keys or shapes are not the expected ones, with the counts (a checkpoint of another
    backbone family matches few of this model's tensors) and a few of the differing names."""
    found = {key: tuple(shape) for key, shape in found.items()}
    expected = {key: tuple(shape) for key, shape in expected.items()}
    if found == expected:
        return
    matched = sum(found.get(key) == shape for key, shape in expected.items())
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    resized = sorted(key for key in expected.keys() & found.keys() if found[key] != expected[key])
    details = []
    if missing:
        details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:SHOWN_KEYS])})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:SHOWN_KEYS])})")
    if resized:
        details.append(f"{len(resized)} of another shape (e.g. {resized[0]} is {found[resized[0]]} in the file, "
                       f"{expected[resized[0]]} in the model)")
    raise WeightFileError(f"{source} holds the weights of another model: {matched} of {len(expected)} expected "
                          f"tensors match; {'; '.join(details)}. Expected {wanted}")
