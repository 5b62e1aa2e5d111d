"""`python -m affordvla.bench [--only NAME ...]`: run the benchmarks, merge figures into results.json."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from affordvla.bench.results import RESULTS, merge_results

log = logging.getLogger("affordvla.bench")


def _fresh_default_run(task_name: str, overrides: list[str] = ()) -> tuple[dict[str, float], float]:
    """The embedded default (plus `overrides`) exactly as `make train` runs it on a fresh clone: the tiny
    checkpoint and the generated dataset are written into empty folders, so pre-training and data generation
    count in the time. Test metrics and wall seconds."""
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="affordvla-bench-fresh-") as fresh:
        subprocess.run([sys.executable, "-m", "affordvla.train", f"task_name={task_name}",
                        f"paths.artifacts_dir={fresh}/artifacts", f"paths.data_dir={fresh}/data", *overrides],
                       check=True)
    wall = time.perf_counter() - started
    runs = sorted(Path(f"outputs/runs/{task_name}").glob("*/metrics.json"))
    return json.loads(runs[-1].read_text()), wall


def _keypoint_figures(prefix: str, metrics: dict[str, float], wall: float) -> dict[str, float]:
    figures = {
        f"{prefix}.keypoint_error": metrics["test/keypoint_error"],
        f"{prefix}.mean_baseline_error": metrics["test/mean_baseline_error"],
        f"{prefix}.error_ratio_to_baseline": metrics["test/keypoint_error"] / metrics["test/mean_baseline_error"],
        f"{prefix}.parse_failure_rate": metrics["test/parse_failure_rate"],
        f"{prefix}.kalie_corrected_avg_mse": metrics["test/kalie_corrected/avg_mse"],
        f"{prefix}.train_seconds": metrics["train_seconds"],
        f"{prefix}.wall_seconds": wall,
    }
    # KALIE's own scorer has no mean when every answer made it raise; its failures are then the figure
    for name in ("avg_mse", "scoring_failures"):
        if f"test/kalie_compat/{name}" in metrics:
            figures[f"{prefix}.kalie_compat_{name}"] = metrics[f"test/kalie_compat/{name}"]
    return figures


def bench_default() -> dict[str, float]:
    """`make train` as on a fresh clone. The default backbone is the tiny PaliGemma, so its figures are also
    `backbone.paligemma.*` (the per-backbone comparison of bench_backbone_learning)."""
    metrics, wall = _fresh_default_run("bench_default")
    figures = _keypoint_figures("default", metrics, wall)
    figures["backbone.paligemma.keypoint_error"] = figures["default.keypoint_error"]
    figures["backbone.paligemma.error_ratio_to_baseline"] = figures["default.error_ratio_to_baseline"]
    return figures


def bench_gpu_throughput() -> dict[str, float]:
    from affordvla.bench import gpu_throughput

    return gpu_throughput.run()


def bench_backbone_learning() -> dict[str, float]:
    """The embedded default switched to each other backbone family by one override (each pre-trained by the same
    pointing stages, answering in its own format), into empty folders like `make train`."""
    figures = {}
    for family in ("llava", "cogvlm"):
        metrics, wall = _fresh_default_run(f"bench_backbone_{family}", [f"backbone={family}_tiny"])
        figures.update(_keypoint_figures(f"backbone.{family}", metrics, wall))
    return figures


def bench_train_step() -> dict[str, float]:
    from affordvla.bench import train_step
    from affordvla.pretraining.pointing import build_pointing_backbone

    backbone = Path("outputs/bench/work/paligemma-tiny-timing")
    if not (backbone / "config.json").exists():  # weights do not matter for timing: skip the pre-training
        build_pointing_backbone(backbone, steps=1, corpus_size=8, eval_size=2, batch_size=2)
    return train_step.run(backbone)


def bench_data() -> dict[str, float]:
    from affordvla.bench import data

    return data.run()


def bench_synthesis() -> dict[str, float]:
    from affordvla.bench import synthesis

    return synthesis.run()


def bench_heads() -> dict[str, float]:
    from affordvla.bench import heads

    return heads.run()


def bench_backbones() -> dict[str, float]:
    from affordvla.bench import backbones

    return backbones.run()


def bench_serve() -> dict[str, float]:
    from affordvla.bench import serve

    return serve.run()


def bench_reliability() -> dict[str, float]:
    from affordvla.bench import reliability

    return reliability.run()


BENCHMARKS = {"default": bench_default, "train_step": bench_train_step, "data": bench_data,
              "synthesis": bench_synthesis, "heads": bench_heads, "backbones": bench_backbones,
              "backbone_learning": bench_backbone_learning, "gpu_throughput": bench_gpu_throughput,
              "reliability": bench_reliability, "serve": bench_serve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for name in args.only or list(BENCHMARKS):
        log.info("benchmark %s", name)
        figures = BENCHMARKS[name]()
        merge_results(figures)
        log.info("%s: %s", name, json.dumps(figures, indent=2))
    log.info("results in %s", RESULTS)


if __name__ == "__main__":
    main()
