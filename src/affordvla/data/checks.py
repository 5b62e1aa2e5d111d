"""Checks a data module runs before any work: every dataset path the user gave exists with the expected layout,
and (pre-flight) every image decodes fully, so a bad file costs seconds at start-up instead of a crash at step N.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "is empty"
    return "holds " + ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def require_dir(path: str | Path, option: str, expected: str) -> Path:
    """`path` (given by `option`) must be an existing folder holding `expected`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist ({option}: expected {expected})")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder ({option}: expected {expected})")
    return path


def require_file(path: str | Path, option: str, expected: str) -> Path:
    """`path` (named by `option`) must be an existing file; a missing one is reported with what its folder holds,
    which shows a wrong layout at a glance."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder ({option}: expected {expected})")
    where = f"; {path.parent} {_listing(path.parent)}" if path.parent.is_dir() else ""
    raise FileNotFoundError(f"{path} does not exist ({option}: expected {expected}{where})")


def decode_error(path: str | Path) -> str | None:
    """Why the image at `path` does not decode to its last pixel (None: it does). Headers alone prove nothing: a
    truncated PNG opens and fails only when its pixels are read."""
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL raises all of these
        return f"{type(exc).__name__}: {exc}"


def unreadable_images(paths: Iterable[str | Path], sample: int | None = None,
                      seed: int = 0) -> tuple[dict[str, str], int]:
    """Decode each distinct image of `paths` (or a seeded `sample` of them, for sets too large to read at every
    start); returns ({path: why it failed}, how many were checked)."""
    distinct = list(dict.fromkeys(str(p) for p in paths))
    if sample is not None and sample < len(distinct):
        chosen = np.random.default_rng(seed).choice(len(distinct), size=sample, replace=False)
        distinct = [distinct[i] for i in sorted(chosen)]
    failed = {}
    for path in distinct:
        error = decode_error(path)
        if error is not None:
            failed[path] = error
    log.info("pre-flight: decoded %d images, %d unreadable", len(distinct), len(failed))
    return failed, len(distinct)
