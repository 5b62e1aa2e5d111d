"""Things built on first use are built once when parallel jobs reach them together."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from affordvla.locking import GENERATED_MARKER, ForeignContentError, LockTimeout, exclusive, write_once

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


def test_write_once_writes_then_reuses_and_refuses_other_settings(tmp_path):
    """The generators' 'write it unless a complete one of these settings is there': the record lists every file
    written and goes in last, so a write that fails is redone, never reused."""
    root, calls = tmp_path / "data", []

    def write():
        calls.append(1)
        (root / "sub").mkdir(parents=True, exist_ok=True)
        (root / "sub" / "payload").write_text(str(len(calls)))

    assert write_once(root, "toy", {"seed": 0}, write) is True
    assert write_once(root, "toy", {"seed": 0}, write) is False and len(calls) == 1
    record = json.loads((root / GENERATED_MARKER).read_text())
    assert record == {"complete": True, "parts": {"toy": {"seed": 0}}, "files": ["sub/payload"]}
    with pytest.raises(ForeignContentError, match="other parameters"):
        write_once(root, "toy", {"seed": 1}, write)
    assert write_once(root, "other part", {"seed": 1}, write) is True  # parts add up in one folder

    def fail():
        (tmp_path / "broken").mkdir(exist_ok=True)
        (tmp_path / "broken" / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_once(tmp_path / "broken", "toy", {"seed": 0}, fail)
    assert not json.loads((tmp_path / "broken" / GENERATED_MARKER).read_text())["complete"]
    # the interrupted folder is the generator's own (claimed while empty): redone, not refused
    assert write_once(tmp_path / "broken", "toy", {"seed": 0}, lambda: None) is True


def test_write_once_never_writes_into_a_folder_with_other_content(tmp_path):
    """A user's file in the folder (before the generator, or added since): nothing is written, not even a lock."""
    user = tmp_path / "user" / "data"
    user.mkdir(parents=True)
    (user / "mine.json").write_text("{}")
    with pytest.raises(ForeignContentError, match=r"mine\.json.*dataset\.root=.*drop it"):
        write_once(user, "toy", {"seed": 0}, lambda: (user / "mine.json").write_text("overwritten"))
    assert (user / "mine.json").read_text() == "{}" and sorted(p.name for p in (tmp_path / "user").rglob("*")) == [
        "data", "mine.json"] and [p.name for p in tmp_path.iterdir()] == ["user"]
    legacy = tmp_path / "legacy"  # generated before the record listed its files: rewritten once, then recorded
    legacy.mkdir()
    (legacy / "toy_actions.json").write_text("{}")
    assert write_once(legacy, "toy", {"seed": 0}, lambda: (legacy / "a").write_text("a")) is True
    assert json.loads((legacy / GENERATED_MARKER).read_text())["files"] == ["a", "toy_actions.json"]
    generated = tmp_path / "generated"
    write_once(generated, "toy", {"seed": 0}, lambda: (generated / "a").write_text("a"))
    (generated / "added.png").write_bytes(b"user")  # a user's file, or a reader's cache, beside generated data
    assert write_once(generated, "toy", {"seed": 0}, lambda: None) is False  # complete: read, nothing written
    with pytest.raises(ForeignContentError, match="added.png"):
        write_once(generated, "another part", {"seed": 1}, lambda: None)
