"""CALVIN long-horizon evaluation.

Each evaluated sequence chains 5 subtasks and stops at the first failure, so its result is the number of
subtasks completed in a row (0..5). "i in a row" is the fraction of sequences with result >= i, and Avg. Len. is
the mean result (which equals the sum of the five rates). The metrics here work from recorded results, so they
run anywhere; rollouts.py produces such results closed-loop (the toy simulator everywhere, CALVIN with its
simulator installed).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

SUBTASKS = 5


def long_horizon_metrics(results: list[int] | np.ndarray) -> dict[str, float]:
    results = np.asarray(results)
    if results.ndim != 1 or len(results) == 0:
        raise ValueError("results must be a non-empty list of per-sequence counts")
    if results.min() < 0 or results.max() > SUBTASKS or not np.all(results == np.round(results)):
        raise ValueError(f"each result counts completed subtasks: an integer in 0..{SUBTASKS}")
    rates = {f"success_{i}": float((results >= i).mean()) for i in range(1, SUBTASKS + 1)}
    return {**rates, "avg_len": float(results.mean()), "sequences": len(results)}


def results_from_sequences(sequences: list[list[bool]]) -> list[int]:
    """Per-sequence subtask outcomes (in order) -> completed-in-a-row counts; evaluation stops at a failure, so
    anything after the first False is ignored."""
    counts = []
    for outcome in sequences:
        count = 0
        for success in outcome[:SUBTASKS]:
            if not success:
                break
            count += 1
        counts.append(count)
    return counts


def load_results(path: str | Path) -> list[int]:
    """A results file: a JSON list of counts, or of per-subtask boolean lists, or JSON lines with "result"."""
    path = Path(path)
    text = path.read_text(encoding="utf-8").strip()
    try:
        data = json.loads(text)
        if not isinstance(data, list):
            raise TypeError(f"top level is a {type(data).__name__}")
    except (json.JSONDecodeError, TypeError):
        try:
            data = [json.loads(line)["result"] for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: neither a JSON list nor JSON lines with 'result' ({exc!r})") from None
    if data and isinstance(data[0], list):
        return results_from_sequences(data)
    return [int(v) for v in data]


def require_simulator(name: str) -> None:
    """Rollouts need the simulator's own package; say which one when it is missing."""
    packages = {"calvin": ("calvin_env", "https://github.com/mees/calvin (install calvin_env and its assets)"),
                "rlbench": ("rlbench", "RLBench with PyRep and CoppeliaSim"),
                "simpler": ("simpler_env", "SimplerEnv (github.com/simpler-env/SimplerEnv)")}
    if name not in packages:
        raise ValueError(f"unknown simulator {name!r}; valid: {sorted(packages)}")
    module, how = packages[name]
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(f"rollouts in {name} need the `{module}` package, which is not installed here: {how}. "
                           "Offline metrics from recorded results work without it (affordvla.evaluation.calvin).")
