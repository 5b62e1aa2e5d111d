"""`affordvla-table`: render a paper table from the MLflow runs of its cells.

    affordvla-table experiments/<table> [--scale full|smoke...] [--tracking-uri URI] [--out DIR]
                    [--run-missing] [--rerun-stale] [--override KEY=VALUE ...] [--log] [--strict]

`<table>/table.yaml` names the columns (metric keys) and rows (experiment configs `conf/experiment/<cell>.yaml`,
with the published numbers). For every row, the newest finished run tagged `experiment=<cell>` and
`scale=<scale>` gives the measured values. A run whose `config_hash` tag differs from the hash of the cell as
composed now is marked stale; a row without a run is marked missing. `--run-missing` trains the missing cells
first (`affordvla-train experiment=<cell> ...`); the command then exits with status 1 if any cell it trained
failed, even when others succeeded (the table is written all the same, those cells marked failed). Writes
table.md, table.csv, table.json and table.png into --out (default outputs/tables/<table>/) and, with --log, logs
them as MLflow run `table-<table>` in experiment `affordvla-tables`.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from affordvla.cli import console_command
from affordvla.resolvers import project_root
from affordvla.tracking.runs import default_tracking_uri
from affordvla.tracking.tables import (
    FAILED,
    MISSING,
    OK,
    REFERENCE,
    STALE,
    Cell,
    Row,
    TableError,
    TableSpec,
    cell_overrides,
    collect,
    current_hash,
    load_spec,
    log_table,
    write_outputs,
)


def stream_process(command: list[str], log_file: Path) -> int:
    """Run `command`, showing its output live and keeping it in `log_file`; returns the exit code."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_file, "wb") as log, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT) as child:
        # chunks, not lines: the progress bar redraws with carriage returns
        while chunk := child.stdout.read1(4096):
            log.write(chunk)
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        return child.wait()


def run_cell(row: Row, overrides: list[str], tracking_uri: str, log_file: Path, index: str) -> bool:
    """Train one cell in a child `affordvla-train`."""
    command = [sys.executable, "-m", "affordvla.train", *overrides, f"paths.mlflow_uri={tracking_uri}"]
    print(f"{index} {row.name}: affordvla-train {' '.join(command[3:])}", flush=True)
    started = time.perf_counter()
    code = stream_process(command, log_file)
    seconds = time.perf_counter() - started
    if code:
        print(f"{index} {row.name}: FAILED (exit {code}) after {seconds:.0f} s; log: {log_file}", flush=True)
        return False
    print(f"{index} {row.name}: done in {seconds:.0f} s", flush=True)
    return True


# ---------------------------------------------------------------------------------------------- command line

def build_table(folder: str | Path, *, scale: str = "full", tracking_uri: str | None = None,
                out: str | Path | None = None, extra_overrides: list[str] | None = None, run_missing: bool = False,
                rerun_stale: bool = False, log: bool = False) -> tuple[TableSpec, list[Cell], dict[str, Path]]:
    """Everything `affordvla-table` does; returns the spec, the cells and the written files."""
    spec = load_spec(folder)
    uri = tracking_uri or default_tracking_uri()
    extra = list(extra_overrides or [])
    cells_to_run = [row for row in spec.rows if row.experiment is not None]
    overrides = {row.name: cell_overrides(spec, row, scale, extra) for row in cells_to_run}
    hashes = {row.name: current_hash(spec, row, overrides[row.name]) for row in cells_to_run}  # fails early
    cells = collect(spec, uri, scale, hashes)
    out_dir = Path(out) if out else Path(project_root()) / "outputs" / "tables" / spec.name
    todo = [c for c in cells if c.status == MISSING or (rerun_stale and c.status == STALE)] if run_missing else []
    failed = set()
    for i, cell in enumerate(todo, 1):
        slug = cell.row.experiment.replace("/", "__")
        log_file = out_dir / "logs" / f"{slug}.log"
        if not run_cell(cell.row, overrides[cell.row.name], uri, log_file, f"[{i}/{len(todo)}]"):
            failed.add(cell.row.name)
    if todo:
        cells = collect(spec, uri, scale, hashes)
        for cell in cells:
            if cell.row.name in failed and cell.status == MISSING:
                cell.status = FAILED
    files = write_outputs(spec, cells, out_dir, scale, uri)
    if log:
        files["mlflow_run"] = Path(log_table(spec, cells, files, uri, scale))  # the run id, for the caller
    return spec, cells, files


@console_command("affordvla-table")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="affordvla-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="experiment folder holding table.yaml (e.g. experiments/kalie_ablations)")
    parser.add_argument("--scale", default="full", help="'full' (default) or a smoke scale such as 'smoke': which "
                        "runs to collect (tag scale) and, at a smoke scale, the table's smoke_overrides")
    parser.add_argument("--tracking-uri", help="MLflow store (default $AFFORDVLA_MLFLOW_URI or "
                        "sqlite:///outputs/mlflow.db)")
    parser.add_argument("--out", help="output folder (default outputs/tables/<table>/)")
    parser.add_argument("--run-missing", action="store_true", help="train the cells that have no run first; "
                        "exit status 1 if any of them failed")
    parser.add_argument("--rerun-stale", action="store_true", help="with --run-missing: also re-train stale cells")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every cell (also part of the config hash), repeatable")
    parser.add_argument("--log", action="store_true", help="log the rendered files to MLflow (affordvla-tables)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a cell is stale, missing or failed")
    args = parser.parse_args(argv)
    try:
        spec, cells, files = build_table(args.folder, scale=args.scale, tracking_uri=args.tracking_uri, out=args.out,
                                         extra_overrides=args.override, run_missing=args.run_missing,
                                         rerun_stale=args.rerun_stale, log=args.log)
    except TableError as exc:
        print(f"affordvla-table: {exc}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text(encoding="utf-8"))
    shown = {k: str(v) for k, v in files.items()}
    print(json.dumps(shown, indent=2))
    incomplete = [c.row.name for c in cells if c.status not in (OK, REFERENCE)]
    if incomplete:
        print(f"affordvla-table: {len(incomplete)} of {len(cells)} cells not up to date: {incomplete}",
              file=sys.stderr)
    failed = [c.row.name for c in cells if c.status == FAILED]
    if failed:  # a training that failed is a failure of this command, whatever the other cells did
        print(f"affordvla-table: error: {len(failed)} cell(s) failed to train: {failed}; their logs are under "
              f"{files['markdown'].parent / 'logs'}", file=sys.stderr)
        return 1
    return 1 if (args.strict and incomplete) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
