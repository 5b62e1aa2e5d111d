"""Writes a synthesised dataset in KALIE's JSON format, one sample at a time, so a crash loses at most one sample.

Per sample: the mask PNGs, then the image, then a journal record `.synthesis/entries/entry_n.json`, each written
to a temp file in the same folder and renamed into place. A journal record therefore always has its image, and
an image without its record is simply rewritten on resume. The KALIE index files (`data_jsonformat.json`,
`data_strformat.json`) are rebuilt from the records every `index_every` samples and at the end, with the same
serialisation as data/kalie.py's writer; `manifest.json` is written last and marks the dataset complete.
(data/kalie.py's `write_kalie_dataset` rewrites both index files on every call, which per sample would be
quadratic in the dataset size; its entry format functions are reused here.)
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affordvla.data.kalie import (
    IMG_DIR,
    JSON_NAME,
    MANIFEST,
    SPLITS_FILE,
    STR_NAME,
    KalieFormatError,
    parse_points_string,
    points_to_json_string,
    points_to_str_format,
)

log = logging.getLogger(__name__)

STATE_DIR = ".synthesis"
PREVIEW = "preview.png"
MASK_DIR = "masks"
_TMP_SUFFIX = ".tmp"


class SynthesisOutputError(RuntimeError):
    """The output folder cannot take this run (it holds another run or another dataset)."""


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through a temp file in the target folder, then rename: a reader or a resumed run never sees a
    half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def entry_index(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


def _dump_json(data: Any) -> Callable[[Any], None]:
    return lambda f: json.dump(data, f, indent=4)


class SynthesisWriter:
    """The output folder of one synthesis run. `params` identify the run: resuming with other parameters is
    refused, so one folder never mixes two runs."""

    def __init__(self, root: str | Path, params: Mapping[str, Any], *, index_every: int = 50):
        self.root = Path(root)
        self.params = json.loads(json.dumps(params))  # plain JSON types, so comparisons are exact
        self.index_every = max(1, int(index_every))
        self.state = self.root / STATE_DIR
        self.journal = self.state / "entries"
        self.rejections = self.state / "rejected"  # variants the image filter refused: left out, not redone
        params_file = self.state / "params.json"
        if params_file.is_file():
            previous = json.loads(params_file.read_text(encoding="utf-8"))
            if previous != self.params:
                raise SynthesisOutputError(
                    f"{self.root} holds a synthesis run with other parameters ({params_file}); choose another "
                    "output folder or delete this one")
        elif (self.root / JSON_NAME).exists():
            raise SynthesisOutputError(f"{self.root} already holds a KALIE dataset that this stage did not write; "
                                       "choose an empty output folder")
        for folder in (self.root / IMG_DIR, self.root / MASK_DIR, self.journal, self.rejections):
            folder.mkdir(parents=True, exist_ok=True)
        if not params_file.is_file():
            atomic_write(params_file, _dump_json(self.params))
        self._remove_stale_temp_files()
        self.entries: dict[str, dict[str, Any]] = self._load_journal()
        self.rejected: dict[str, dict[str, Any]] = {
            p.stem: json.loads(p.read_text(encoding="utf-8")) for p in self.rejections.glob("entry_*.json")}
        self._since_index = 0

    # ------------------------------------------------------------------------------------------------ state
    def _remove_stale_temp_files(self) -> None:
        # Left by a run killed between writing a temp file and renaming it; only our own pattern is touched.
        for folder in (self.root, self.root / IMG_DIR, self.root / MASK_DIR, self.state, self.journal,
                       self.rejections):
            for path in folder.glob(f".*{_TMP_SUFFIX}"):
                path.unlink(missing_ok=True)

    def _load_journal(self) -> dict[str, dict[str, Any]]:
        done = {}
        for path in self.journal.glob("entry_*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                image_ok = (self.root / record["entry"]["img"]).is_file()
            except (ValueError, KeyError, TypeError):
                image_ok = False
            if image_ok:
                done[path.stem] = record
            else:  # cannot come from this writer (renames are atomic); redo the sample rather than trust it
                log.warning("discarding unreadable synthesis record %s", path)
                path.unlink()
        return done

    def is_complete(self) -> bool:
        return (self.root / MANIFEST).is_file()

    def done(self, key: str) -> bool:
        return key in self.entries or key in self.rejected

    def reject(self, key: str, record: Mapping[str, Any]) -> None:
        """Record that `key` is left out (the image filter refused every attempt), so a resumed run skips it."""
        atomic_write(self.rejections / f"{key}.json", _dump_json(dict(record)))
        self.rejected[key] = json.loads(json.dumps(dict(record)))

    # ------------------------------------------------------------------------------------------------ samples
    def write(self, key: str, image: np.ndarray | bytes, points: Mapping[str, Any], other: Mapping[str, Any],
              masks: Mapping[str, np.ndarray], record: Mapping[str, Any]) -> None:
        """One sample: masks, image, then its record. `image` is an HxWx3 uint8 array or PNG bytes (an original
        copied as it is)."""
        where = f"{self.root / JSON_NAME}, entry {key!r}"
        if isinstance(image, np.ndarray) and (image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3):
            raise ValueError(f"{where}: image must be uint8 HxWx3, got {image.dtype} {image.shape}")
        checked = parse_points_string(points_to_json_string(points), where=where)  # KALIE's own range checks
        mask_paths = {}
        for k, (name, mask) in enumerate(masks.items()):
            rel = f"{MASK_DIR}/{key}_{k}.png"
            data = png_bytes(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
            atomic_write(self.root / rel, lambda f, d=data: f.write(d), mode="wb")
            mask_paths[name] = rel
        rel_img = f"{IMG_DIR}/{key}.png"
        data = image if isinstance(image, bytes) else png_bytes(image)
        atomic_write(self.root / rel_img, lambda f: f.write(data), mode="wb")
        other = dict(other)
        if mask_paths or "masks" in other:
            other["masks"] = mask_paths
        entry = {"img": rel_img, "points": points_to_json_string(checked), "other": other}
        full = {"entry": entry, "str_points": points_to_str_format(checked), "record": dict(record)}
        atomic_write(self.journal / f"{key}.json", _dump_json(full))
        self.entries[key] = json.loads(json.dumps(full))
        self._since_index += 1
        if self._since_index >= self.index_every:
            self.write_index()

    # ------------------------------------------------------------------------------------------------ index
    def write_index(self) -> None:
        """Both KALIE index files from the samples written so far (a valid, possibly partial, dataset)."""
        keys = sorted(self.entries, key=entry_index)
        js = {k: self.entries[k]["entry"] for k in keys}
        st = {k: {**self.entries[k]["entry"], "points": self.entries[k]["str_points"]} for k in keys}
        atomic_write(self.root / STR_NAME, _dump_json(st))
        atomic_write(self.root / JSON_NAME, _dump_json(js))
        self._since_index = 0

    def finish(self, expected: list[str], splits: Mapping[str, list[str]] | None, manifest: Mapping[str, Any],
               preview: Callable[[Path], None] | None = None) -> None:
        missing = [k for k in expected if k not in self.entries and k not in self.rejected]
        if missing:
            raise KalieFormatError(f"{self.root}: {len(missing)} planned entries were not written: {missing[:5]}")
        self.write_index()
        if splits is not None:
            atomic_write(self.root / SPLITS_FILE, _dump_json(dict(splits)))
        if preview is not None:
            preview(self.root / PREVIEW)
        atomic_write(self.root / MANIFEST, _dump_json(dict(manifest)))  # last: marks the dataset complete
