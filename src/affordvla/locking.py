"""A cross-process lock for things built on first use and shared by every later run (tiny checkpoints, generated
datasets, synthesis outputs). Parallel sweep jobs reach the same "build it if missing" step at the same moment:
the first takes the lock and builds, the others wait, then find the result and reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller was willing to wait."""


@contextlib.contextmanager
def exclusive(target: str | Path, *, timeout: float | None = None, poll: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on `<target>.lock` (a sibling file, so the target itself can be renamed into place)
    for the block. The lock dies with its process, so a killed builder never leaves it held. `timeout=None` waits
    as long as it takes."""
    lock_path = Path(f"{Path(target).resolve()}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        started = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    log.info("waiting for %s, which is building %s", holder, target)
                    announced = True
                if timeout is not None and time.monotonic() - started > timeout:
                    raise LockTimeout(f"{lock_path} stayed locked for {timeout:.0f} s (held by {holder}); if no "
                                      "job is running, the holder was on another machine: delete the file") from None
                time.sleep(poll)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ForeignContentError(ValueError):
    """A folder the generator was asked to write into holds something it did not write: it is never written to."""


# The generator's record in a folder it owns: what it wrote (every file) and with which settings (per part).
GENERATED_MARKER = ".affordvla-generated.json"
# what the generators left before they kept that record (no file list): such a folder is theirs, written anew once
LEGACY_MARKERS = ("generation.json", "toy_robopoint.json", "toy_actions.json", "toy_oxe.json", ".toy_rlbench")


def _read_marker(root: Path) -> dict | None:
    marker = root / GENERATED_MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise ForeignContentError(f"{marker}: unreadable generator record ({exc}); the folder is left alone: "
                                  "delete it if it is generated data, or drop the dataset.root override") from None
    if not isinstance(record, dict) or not isinstance(record.get("parts"), dict):
        raise ForeignContentError(f"{marker}: not a generator record; the folder is left alone")
    return record


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()} - {GENERATED_MARKER}


def check_generator_owns(root: str | Path, override: str = "dataset.root", writing: bool = True) -> dict | None:
    """The generator's record of `root` (None: nothing there yet), or ForeignContentError when `root` holds a file
    it did not write: a user's data, never to be written over. With `writing=False` (data that is only to be read
    if complete) a folder the record claims passes as it is: readers may cache derived files beside the data.
    `override` names the setting that points the generator there."""
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise ForeignContentError(f"{root} is a file, not a folder for generated data; drop the {override} override")
    record = _read_marker(root)
    if record is None and any((root / name).exists() for name in LEGACY_MARKERS):
        return {"complete": False, "parts": {}, "files": []}
    if record is not None and (not record.get("complete") or not writing):
        return record  # claimed while empty (then perhaps interrupted): the generator's folder
    foreign = sorted(_files(root) - set(record["files"] if record else ()))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ForeignContentError(
            f"{root} holds files the data generator did not write ({shown}), so no generated data is written there. "
            f"If {override}={root} was given as an override, drop it to use the project's own generated folder (or "
            f"set dataset.generate=null to read the data that is there); otherwise move those files out")
    return record


def write_once(root: str | Path, part: str, recorded: dict, write: Callable[[], None],
               override: str = "dataset.root") -> bool:
    """Call `write()` (which fills `root`) unless the generator's record in `root` already holds `part` with exactly
    the settings `recorded`. A folder holding anything the generator did not write is refused before anything is
    created (ForeignContentError), as is a part recorded with other settings. The record claims an empty folder
    before writing and lists every file once `write()` returned, so an interrupted write is redone and never
    reused. Under `exclusive(root)`: parallel jobs of a sweep wait for the first and reuse its result. True when
    this call wrote."""
    root = Path(root)
    recorded = json.loads(json.dumps(recorded))  # as it reads back from the record
    check_generator_owns(root, override, writing=False)  # before the lock: no lock file beside a user's folder
    with exclusive(root):
        record = check_generator_owns(root, override, writing=False) or {"parts": {}, "files": []}
        done = record.get("complete")
        if done and record["parts"].get(part) == recorded:
            return False
        if done and part in record["parts"]:
            raise ForeignContentError(
                f"{root} holds generated data of {part} with other parameters ({record['parts'][part]}, asked "
                f"{recorded}); generated folders are named by their settings, so this one was given by hand: drop "
                f"the {override}={root} override, or delete the folder")
        check_generator_owns(root, override)  # about to write: nothing in it but what the generator wrote
        parts = {k: v for k, v in record["parts"].items() if done}
        root.mkdir(parents=True, exist_ok=True)
        _write_marker(root, {"complete": False, "parts": parts, "files": record["files"]})
        write()
        _write_marker(root, {"complete": True, "parts": {**parts, part: recorded}, "files": sorted(_files(root))})
        return True


def _write_marker(root: Path, record: dict) -> None:
    tmp = root / f"{GENERATED_MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, root / GENERATED_MARKER)
