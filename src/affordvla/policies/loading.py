"""`load_policy(export_dir)`: the one door through which evaluation, rollouts and the server load a policy.

It reads policy.json, checks its format version, and hands the folder to the loader of its kind. Exports written
before the format had a version (version 0) are read through `legacy_record`, which rebuilds the record their
files imply; anything else is refused with what was found and what was expected.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from affordvla.policies.base import FORMAT_VERSION, POLICY_FILE, Policy, PolicyFormatError

# each kind's package (affordvla.policies.<package>) offers `load(export_dir, record) -> Policy`
LOADERS = {"keypoints": "keypoints", "actions": "actions"}
# version-0 exports: the file each kind wrote beside the backbone
LEGACY_FILES = {"keypoint_head.json": "keypoints", "decoding.json": "keypoints"}


def read_policy_record(export_dir: str | Path) -> dict[str, Any]:
    """policy.json of an export (or the record a version-0 export implies), checked for kind and version."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"{export_dir}: no such export folder (affordvla-train's export_dir, or "
                                "affordvla-export's output)")
    path = export_dir / POLICY_FILE
    if not path.is_file():
        legacy = [name for name in LEGACY_FILES if (export_dir / name).is_file()]
        if not legacy:
            raise PolicyFormatError(f"{export_dir} has no {POLICY_FILE}: not an exported policy (expected the "
                                    "folder affordvla-train writes to export_dir)")
        return {"kind": LEGACY_FILES[legacy[0]], "format_version": 0}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PolicyFormatError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(record, dict):
        raise PolicyFormatError(f"{path}: expected a JSON object, got {type(record).__name__}")
    if "format_version" not in record:  # version 0: action policies wrote policy.json without kind or version
        return {"kind": "actions", "format_version": 0}
    version = record["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise PolicyFormatError(f"{path}: format_version {version!r} is not one this affordvla reads (0 to "
                                f"{FORMAT_VERSION}); it was written by a newer affordvla: upgrade to load it")
    if record.get("kind") not in LOADERS:
        raise PolicyFormatError(f"{path}: kind {record.get('kind')!r} is not one of {sorted(LOADERS)}")
    return record


def load_policy(export_dir: str | Path, *, device: str | torch.device | None = None) -> Policy:
    """The exported policy in `export_dir`, in eval mode, on `device` (default: where it loads, the CPU)."""
    export_dir = Path(export_dir)
    record = read_policy_record(export_dir)
    package = importlib.import_module(f"affordvla.policies.{LOADERS[record['kind']]}")
    policy = package.load(export_dir, record)
    return policy.to(device) if device is not None else policy
