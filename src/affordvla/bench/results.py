"""The shared results file: one flat JSON object, merged so one benchmark can run alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(os.environ.get("AFFORDVLA_BENCH_RESULTS", "outputs/bench/results.json"))


def merge_results(figures: dict[str, float], path: Path = RESULTS) -> dict[str, float]:
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(figures)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return current
