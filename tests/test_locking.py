"""Things built on first use are built once when parallel jobs reach them together."""

from __future__ import annotations

import subprocess
import sys

import pytest

from affordvla.locking import LockTimeout, exclusive, write_once

BUILD_ONCE = """
import sys, time
from pathlib import Path
from affordvla.locking import exclusive
target = Path(sys.argv[1])
with exclusive(target):
    if not target.exists():
        time.sleep(0.5)  # a slow build: the other jobs arrive meanwhile
        with open(target.parent / "builds.log", "a") as log:
            log.write(sys.argv[2] + "\\n")
        target.write_text("built by " + sys.argv[2])
print(target.read_text())
"""


def test_three_jobs_build_a_missing_artifact_once_and_all_use_it(tmp_path):
    target = tmp_path / "artifact"
    jobs = [subprocess.Popen([sys.executable, "-c", BUILD_ONCE, str(target), f"job{i}"], stdout=subprocess.PIPE,
                             text=True) for i in range(3)]
    outputs = [job.communicate(timeout=60)[0].strip() for job in jobs]
    assert all(job.returncode == 0 for job in jobs)
    builds = (tmp_path / "builds.log").read_text().split()
    assert len(builds) == 1
    assert outputs == [f"built by {builds[0]}"] * 3


def test_a_held_lock_times_out_with_the_holder_named(tmp_path):
    target = tmp_path / "artifact"
    hold = (f"import time\nfrom affordvla.locking import exclusive\nwith exclusive({str(target)!r}):\n"
            "    print('held', flush=True)\n    time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match=f"pid {holder.pid}"), exclusive(target, timeout=0.3, poll=0.05):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(target, timeout=5):  # a killed holder leaves nothing held
        pass


def test_write_once_writes_then_reuses_until_the_record_changes(tmp_path):
    """The generators' 'write it unless a complete one of these settings is there': the record goes in last, so a
    write that fails leaves nothing to reuse."""
    root, calls = tmp_path / "data", []

    def write():
        calls.append(1)
        (root / "payload").parent.mkdir(parents=True, exist_ok=True)
        (root / "payload").write_text(str(len(calls)))

    assert write_once(root, "done.json", {"seed": 0}, write) is True
    assert write_once(root, "done.json", {"seed": 0}, write) is False and len(calls) == 1
    assert (root / "done.json").read_text() == '{"seed": 0}'
    assert write_once(root, "done.json", {"seed": 1}, write) is True and (root / "payload").read_text() == "2"

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_once(tmp_path / "broken", "done.json", {"seed": 0}, fail)
    assert not (tmp_path / "broken" / "done.json").exists()
