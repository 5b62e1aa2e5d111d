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


def write_once(root: str | Path, marker_name: str, recorded: dict, write: Callable[[], None]) -> bool:
    """Call `write()` (which fills `root`) unless `root/marker_name` already records exactly `recorded`, then write
    that record, last, so a half-written result is never reused. Under `exclusive(root)`: parallel jobs of a sweep
    wait for the first and reuse its result. True when this call wrote."""
    root = Path(root)
    marker = root / marker_name
    with exclusive(root):
        if marker.is_file() and json.loads(marker.read_text()) == recorded:
            return False
        write()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(recorded))
        return True
