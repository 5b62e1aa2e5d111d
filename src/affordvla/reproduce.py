"""`affordvla-reproduce`: re-run a tracked run from its logged config and check that the result is the same.

    affordvla-reproduce RUN_ID [--tracking-uri URI] [--target-uri URI] [--output-dir DIR] [--rtol R] [--atol A]
                        [--override KEY=VALUE ...] [--against OTHER_RUN_ID] [--format markdown|json] [--report FILE]

The run's `run/overrides.json` is replayed through `affordvla-train` (the same overrides, `paths.root_dir`
pinned to the original's so data and backbones are found where the run found them) into a new output folder,
logging into the same store unless --target-uri says otherwise. Then it checks:

  config_hash  the `config_hash` tags are equal;
  metrics      every final metric is equal (within --rtol/--atol; timings such as train_seconds are left out);
  weights      the fine-tuned weights (`model/*.safetensors`, else the last `checkpoints/step_*`) are equal
               tensor by tensor (within --rtol/--atol);
  git_sha      reported, with a warning when it differs or a tree was dirty (not a failure).

Exit 0 when config hash, metrics and weights all match, 1 otherwise, 2 on a usage error. `--against` compares
with an existing run instead of training again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from affordvla.cli import console_command
from affordvla.tables import stream_process
from affordvla.tracking.reproduce import (
    ReproduceError,
    RerunFailed,
    compare_runs,
    existing_store,
    find_run_by_name,
    get_run,
    logged_config,
    render_markdown,
    replay_overrides,
)
from affordvla.tracking.runs import default_tracking_uri


def train_again(replay: list[str], log_file: Path) -> None:
    command = [sys.executable, "-m", "affordvla.train", *replay]
    print(f"affordvla-reproduce: affordvla-train {' '.join(replay)}", flush=True)
    started = time.perf_counter()
    code = stream_process(command, log_file)
    if code:
        raise RerunFailed(f"the re-run failed (exit {code}); its output is in {log_file}")
    print(f"affordvla-reproduce: trained again in {time.perf_counter() - started:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------- command line

def reproduce(run_id: str, *, tracking_uri: str | None = None, target_uri: str | None = None,
              output_dir: str | Path | None = None, extra_overrides: list[str] | None = None,
              against: str | None = None, rtol: float = 0.0, atol: float = 0.0) -> dict[str, Any]:
    source_uri = tracking_uri or default_tracking_uri()
    target = target_uri or source_uri
    source = existing_store(source_uri)
    original = get_run(source, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        overrides, config = logged_config(source, run_id, Path(tmp) / "original")
        if against:
            other_client = existing_store(target)
            again = get_run(other_client, against)
            _, again_config = logged_config(other_client, against, Path(tmp) / "again")
        else:
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
            if output_dir is None:
                root = Path((config.get("paths") or {}).get("output_root") or Path("outputs").resolve())
                output_dir = root / "reproduce" / f"{run_id[:8]}_{stamp}"
            output_dir = Path(output_dir).resolve()
            if output_dir.exists() and any(output_dir.iterdir()):
                raise ReproduceError(f"{output_dir} already holds files: give a new --output-dir")
            run_name = f"reproduce-{run_id[:8]}-{stamp}"
            replay = replay_overrides(overrides, config, target_uri=target, output_dir=output_dir,
                                      run_name=run_name, extra=list(extra_overrides or []))
            train_again(replay, output_dir.parent / f"{output_dir.name}.log")
            other_client = existing_store(target)
            again = find_run_by_name(other_client, run_name)
            _, again_config = logged_config(other_client, again.info.run_id, Path(tmp) / "again")
        report = compare_runs(original, again, config, again_config, rtol, atol)
    report["overrides"] = overrides
    return report


@console_command("affordvla-reproduce")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="affordvla-reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", help="store holding the run (default $AFFORDVLA_MLFLOW_URI or "
                        "sqlite:///outputs/mlflow.db)")
    parser.add_argument("--target-uri", help="store the re-run logs into (default: the same store)")
    parser.add_argument("--output-dir", help="output folder of the re-run (default "
                        "<output_root>/reproduce/<run>_<time>)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for the re-run (e.g. trainer=gpu), repeatable")
    parser.add_argument("--against", metavar="RUN_ID", help="compare with this existing run instead of re-running")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: identical)")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    parser.add_argument("--report", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    try:
        report = reproduce(args.run_id, tracking_uri=args.tracking_uri, target_uri=args.target_uri,
                           output_dir=args.output_dir, extra_overrides=args.override, against=args.against,
                           rtol=args.rtol, atol=args.atol)
    except ReproduceError as exc:
        print(f"affordvla-reproduce: {exc}", file=sys.stderr)
        return 2
    except RerunFailed as exc:
        print(f"affordvla-reproduce: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2, default=str)
    if args.report:
        Path(args.report).write_text(text)
    print(text if args.format == "json" else render_markdown(report))
    return 0 if report["match"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
