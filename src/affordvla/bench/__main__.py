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


def bench_default() -> dict[str, float]:
    """The embedded default exactly as `make train` runs it on a fresh clone: the tiny checkpoint is built into
    an empty folder, so its pre-training counts in the time (task_name keeps the runs apart)."""
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="affordvla-bench-artifacts-") as artifacts:
        subprocess.run([sys.executable, "-m", "affordvla.train", "task_name=bench_default",
                        f"paths.artifacts_dir={artifacts}"], check=True)
    wall = time.perf_counter() - started
    runs = sorted(Path("outputs/runs/bench_default").glob("*/metrics.json"))
    metrics = json.loads(runs[-1].read_text())
    return {
        "default.keypoint_error": metrics["test/keypoint_error"],
        "default.mean_baseline_error": metrics["test/mean_baseline_error"],
        "default.error_ratio_to_baseline": metrics["test/keypoint_error"] / metrics["test/mean_baseline_error"],
        "default.parse_failure_rate": metrics["test/parse_failure_rate"],
        "default.kalie_avg_mse": metrics["test/kalie_avg_mse"],
        "default.train_seconds": metrics["train_seconds"],
        "default.wall_seconds": wall,
    }


def bench_train_step() -> dict[str, float]:
    from affordvla.backbones.paligemma.pretrain import build_pointing_paligemma
    from affordvla.bench import train_step

    backbone = Path("outputs/bench/work/paligemma-tiny-timing")
    if not (backbone / "config.json").exists():  # weights do not matter for timing: skip the pre-training
        build_pointing_paligemma(backbone, steps=1, corpus_size=8, eval_size=2, batch_size=2)
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


BENCHMARKS = {"default": bench_default, "train_step": bench_train_step, "data": bench_data,
              "synthesis": bench_synthesis, "heads": bench_heads, "backbones": bench_backbones}


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
