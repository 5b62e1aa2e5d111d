"""Things built on first use are built once when parallel jobs reach them together."""

from __future__ import annotations

import subprocess
import sys

import pytest

from affordvla.locking import LockTimeout, exclusive

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
