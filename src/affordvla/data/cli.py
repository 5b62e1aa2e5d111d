"""`affordvla-data`: dataset conversions.

    affordvla-data kalie-from-hdf5 <collection dir> <out dir> [--on-error skip] [--no-str-format]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from affordvla.data.kalie import ON_ERROR_CHOICES, KalieFormatError
from affordvla.data.kalie_hdf5 import hdf5_to_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affordvla-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    kalie = commands.add_parser("kalie-from-hdf5", help="KALIE collection files ({task}/*.hdf5) -> KALIE JSON layout")
    kalie.add_argument("data_dir", help="folder holding one sub-folder per task with the collection .hdf5 files")
    kalie.add_argument("out_dir", help="where imgs/, data_jsonformat.json and data_strformat.json are written")
    kalie.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="raise",
                       help="raise on the first bad file or entry, or skip and count them")
    kalie.add_argument("--no-str-format", action="store_true", help="do not write data_strformat.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "kalie-from-hdf5":
            counts = hdf5_to_json(args.data_dir, args.out_dir, on_error=args.on_error,
                                  write_str_format=not args.no_str_format)
            print(json.dumps(counts))
    except (KalieFormatError, FileNotFoundError) as exc:
        print(f"affordvla-data: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
