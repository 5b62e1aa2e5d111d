"""Reproducibility checks of tracked runs, the library behind `affordvla-reproduce` (affordvla/reproduce.py).

A run's `run/overrides.json` is replayed (`replay_overrides`: the same overrides, `paths.root_dir` pinned to the
original's so data and backbones are found where the run found them) and the two runs compared:

  config_hash  the `config_hash` tags are equal;
  metrics      every final metric is equal (within rtol/atol; timings such as train_seconds are left out);
  weights      the fine-tuned weights (`model/*.safetensors`, else the last `checkpoints/step_*`) are equal
               tensor by tensor (within rtol/atol);
  git_sha      reported, with a warning when it differs or a tree was dirty (not a failure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from affordvla.tracking.runs import open_store

TIMING_SUFFIXES = ("_seconds", "_per_s", "_time")  # wall-clock figures: never reproducible, never compared


class RerunFailed(RuntimeError):
    """The re-run did not finish: the run does not reproduce (exit 1), which is not a usage error (exit 2)."""


class ReproduceError(ValueError):
    """The run cannot be reproduced as asked (unknown id, not an affordvla-train run, failed training)."""


def is_timing(name: str) -> bool:
    return name.endswith(TIMING_SUFFIXES)


def existing_store(uri: str):
    """A client of an existing store: an absent sqlite file is reported, not created empty."""
    try:
        return open_store(uri)
    except FileNotFoundError as exc:
        raise ReproduceError(str(exc)) from None


def get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise ReproduceError(f"run {run_id!r} not found in {client.tracking_uri}: {exc.message}") from None


def logged_config(client, run_id: str, dst: Path) -> tuple[list[str], dict[str, Any]]:
    """The overrides and the resolved config a run logged (artifacts run/overrides.json, run/config_resolved.yaml)."""
    found = {}
    for name in ("overrides.json", "config_resolved.yaml"):
        try:
            found[name] = Path(client.download_artifacts(run_id, f"run/{name}", str(dst)))
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise ReproduceError(f"run {run_id} has no artifact run/{name} (not an affordvla-train run?): "
                                 f"{exc}") from None
    overrides = json.loads(found["overrides.json"].read_text())
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ReproduceError(f"run {run_id}: run/overrides.json is not a list of overrides")
    return overrides, yaml.safe_load(found["config_resolved.yaml"].read_text()) or {}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def replay_overrides(overrides: list[str], config: dict[str, Any], *, target_uri: str, output_dir: Path,
                     run_name: str, extra: list[str]) -> list[str]:
    """The command-line overrides that re-run `config`: the logged ones, `paths.root_dir` pinned to where the
    original run resolved it (if that folder is here), the target store, a fresh output folder and a run name
    to find the new run by. Keys set here replace the logged ones (Hydra applies the last)."""
    replaced = {"paths.mlflow_uri", "logger.mlflow.run_name"}
    replay = [o for o in overrides if _key(o) not in replaced]
    root = (config.get("paths") or {}).get("root_dir")
    if root and Path(root).is_dir() and not any(_key(o) == "paths.root_dir" for o in overrides):
        replay.append(f"paths.root_dir={root}")
    replay += [f"paths.mlflow_uri={target_uri}", f"logger.mlflow.run_name={run_name}",
               f"hydra.run.dir={output_dir}", *extra]
    return replay


def find_run_by_name(client, run_name: str):
    from affordvla.tracking.runs import search_runs

    runs = [r for r in search_runs(client, status=None) if r.info.run_name == run_name]
    if not runs:
        raise ReproduceError(f"the re-run finished but no run named {run_name!r} is in {client.tracking_uri} "
                             "(was it run with logger=none?)")
    return runs[0]


# ---------------------------------------------------------------------------------------------- comparisons

def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if rtol == 0 and atol == 0:
        return a == b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def compare_metrics(original: dict[str, float], again: dict[str, float], rtol: float = 0.0,
                    atol: float = 0.0) -> dict[str, Any]:
    names = sorted(k for k in set(original) | set(again) if not is_timing(k))
    differing = {}
    for name in names:
        a, b = original.get(name), again.get(name)
        if a is None or b is None or not _close(a, b, rtol, atol):
            differing[name] = {"original": a, "reproduced": b}
    return {"match": not differing, "compared": len(names), "differing": differing,
            "skipped_timings": sorted(k for k in set(original) | set(again) if is_timing(k))}


def weights_location(config: dict[str, Any]) -> Path | None:
    """Where a run's final fine-tuned weights are: the exported `model/` folder (export_dir), else the last
    `checkpoints/step_*` of its output folder."""
    export_dir = config.get("export_dir")
    if export_dir and any(Path(export_dir).glob("*.safetensors")):
        return Path(export_dir)
    output_dir = (config.get("paths") or {}).get("output_dir")
    if output_dir:
        steps = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step_*")
                       if (p / "model.safetensors").is_file())
        if steps:
            return steps[-1]
    return None


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `folder` (keys prefixed by the file when they collide)."""
    from affordvla.checkpointing import load_state_dict

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for key, value in load_state_dict(path).items():
            tensors[key if key not in tensors else f"{path.name}:{key}"] = value
    return tensors


def compare_weights(original: Path | None, again: Path | None, rtol: float = 0.0, atol: float = 0.0) -> dict[str, Any]:
    if original is None or again is None:
        return {"match": False, "original": str(original) if original else None,
                "reproduced": str(again) if again else None,
                "error": "no weights found for the " + ("original" if original is None else "reproduced") +
                         " run (model/*.safetensors or checkpoints/step_*/model.safetensors)"}
    a, b = load_weights(original), load_weights(again)
    only_original, only_again = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differing: dict[str, float | str] = {}
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            differing[key] = f"{tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
            continue
        same = torch.equal(x, y) if rtol == 0 and atol == 0 else torch.allclose(x.double(), y.double(), rtol=rtol,
                                                                                 atol=atol, equal_nan=True)
        if not same:
            differing[key] = float((x.double() - y.double()).abs().max())
    return {"match": not (differing or only_original or only_again), "original": str(original),
            "reproduced": str(again), "tensors": len(set(a) & set(b)), "differing": differing,
            "only_original": only_original, "only_reproduced": only_again}


def compare_git(original: str | None, again: str | None) -> dict[str, Any]:
    warnings = []
    if not original or not again or "unknown" in (original, again):
        warnings.append("git sha unknown for one of the runs")
    elif original.split("+")[0] != again.split("+")[0]:
        warnings.append(f"code differs: {original} vs {again}")
    for label, sha in (("original", original), ("reproduced", again)):
        if sha and sha.endswith("+dirty"):
            warnings.append(f"the {label} run's working tree had uncommitted changes")
    return {"original": original, "reproduced": again, "warnings": warnings}


def compare_runs(original, again, original_config: dict[str, Any], again_config: dict[str, Any],
                 rtol: float = 0.0, atol: float = 0.0) -> dict[str, Any]:
    """The full report comparing two runs (MLflow Run objects) and their resolved configs."""
    hash_a, hash_b = original.data.tags.get("config_hash"), again.data.tags.get("config_hash")
    report = {
        "original_run": original.info.run_id,
        "reproduced_run": again.info.run_id,
        "config_hash": {"match": bool(hash_a) and hash_a == hash_b, "original": hash_a, "reproduced": hash_b},
        "metrics": compare_metrics(original.data.metrics, again.data.metrics, rtol, atol),
        "weights": compare_weights(weights_location(original_config), weights_location(again_config), rtol, atol),
        "git_sha": compare_git(original.data.tags.get("git_sha"), again.data.tags.get("git_sha")),
        "tolerance": {"rtol": rtol, "atol": atol},
    }
    report["match"] = all(report[k]["match"] for k in ("config_hash", "metrics", "weights"))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    def mark(ok: bool) -> str:
        return "match" if ok else "MISMATCH"

    h, m, w, g = report["config_hash"], report["metrics"], report["weights"], report["git_sha"]
    lines = [f"# Reproduction of run `{report['original_run']}`", "",
             f"Reproduced as run `{report['reproduced_run']}`: "
             f"**{'reproduced' if report['match'] else 'NOT reproduced'}**"
             f" (rtol={report['tolerance']['rtol']}, atol={report['tolerance']['atol']}).", "",
             "| check | result | detail |", "|---|---|---|",
             f"| config hash | {mark(h['match'])} | `{h['original']}` vs `{h['reproduced']}` |",
             f"| metrics | {mark(m['match'])} | {m['compared']} compared, {len(m['differing'])} differ"
             f" (timings left out: {', '.join(m['skipped_timings']) or 'none'}) |"]
    if "error" in w:
        lines.append(f"| weights | {mark(False)} | {w['error']} |")
    else:
        lines.append(f"| weights | {mark(w['match'])} | {w['tensors']} tensors compared, {len(w['differing'])} differ, "
                     f"{len(w['only_original']) + len(w['only_reproduced'])} in one run only |")
    lines.append(f"| git sha | {'warning' if g['warnings'] else 'same'} | `{g['original']}` vs `{g['reproduced']}` |")
    lines.append("")
    for name, values in m["differing"].items():
        lines.append(f"- metric `{name}`: {values['original']!r} vs {values['reproduced']!r}")
    for name, detail in list(w.get("differing", {}).items())[:20]:
        lines.append(f"- tensor `{name}`: " + (f"max abs diff {detail:.3g}" if isinstance(detail, float) else detail))
    for warning in g["warnings"]:
        lines.append(f"- warning: {warning}")
    return "\n".join(lines) + "\n"
