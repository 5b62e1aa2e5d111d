"""The bad-input corpus as figures: how many mistakes users make were tried, and how many of them ended in a
clear error that touched nothing of the user's.

Each case of `tests/bad_inputs/` is one test that asserts exactly that (non-zero exit, the file, entry or option
named, no traceback, the user's folders unchanged), so a case counts as clear when its test passes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

CORPUS = Path("tests/bad_inputs")


def count_cases(junit_xml: Path) -> tuple[int, int]:
    """(cases tried, cases passed) from a pytest JUnit report; a skipped case is tried and not clear."""
    tried = passed = 0
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        tried += 1
        if not any(child.tag in ("failure", "error", "skipped") for child in case):
            passed += 1
    return tried, passed


def run(corpus: Path = CORPUS) -> dict[str, float]:
    if not corpus.is_dir():
        raise FileNotFoundError(f"{corpus}: the bad-input corpus is not there; run `make bench` from the "
                                "repository root")
    with tempfile.TemporaryDirectory(prefix="affordvla-bench-reliability-") as work:
        report = Path(work) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", str(corpus), "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}"], check=False)
        tried, clear = count_cases(report)
    return {"reliability.bad_inputs": tried, "reliability.clear_errors": clear}
