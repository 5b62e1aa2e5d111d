"""`affordvla-data`: dataset conversions.

    affordvla-data kalie-from-hdf5 <collection dir> <out dir> [--on-error skip] [--no-str-format]
    affordvla-data convert calvin <split dir> <cache.h5>
    affordvla-data convert oxe <data root> <cache.h5> --name bridge_orig [--split train]
    affordvla-data convert rlbench <task folder> <cache.h5> [--cameras front wrist]
    affordvla-data convert kalie <dataset root> <cache.h5>
    affordvla-data convert robopoint <conversations.json> <cache.h5> --images <image folder>
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from affordvla.cli import console_command
from affordvla.data.kalie import ON_ERROR_CHOICES
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
    convert = commands.add_parser("convert", help="episode dataset -> chunked HDF5 cache for window reads")
    convert.add_argument("source_format", choices=("calvin", "oxe", "rlbench", "kalie", "robopoint"))
    convert.add_argument("source", help="CALVIN split folder, the root holding RLDS dataset folders, or an "
                                        "RLBench task folder")
    convert.add_argument("out", help="the .h5 file to write (an interrupted conversion resumes)")
    convert.add_argument("--name", help="RLDS dataset name (oxe)")
    convert.add_argument("--split", default="train", help="split to cache (oxe; 'train' or 'val')")
    convert.add_argument("--cameras", nargs="+", default=["front"], help="RLBench cameras to cache")
    convert.add_argument("--images", help="RoboPoint image folder the conversation file's paths are relative to")
    return parser


def _convert(args) -> dict[str, int]:
    from affordvla.data.h5cache import (
        calvin_episodes,
        convert,
        oxe_episodes,
        rlbench_episodes,
    )

    if args.source_format == "calvin":
        from affordvla.data.calvin import read_language_segments

        total = len(read_language_segments(args.source))
        return convert(calvin_episodes(args.source), args.out, source=str(args.source), source_format="calvin",
                       total=total)
    if args.source_format in ("kalie", "robopoint"):
        from affordvla.data.h5cache import convert_keypoints

        if args.source_format == "kalie":
            from affordvla.data.kalie import load_kalie_sample, read_kalie_index

            entries, _ = read_kalie_index(args.source)
            samples, total = (load_kalie_sample(e) for e in entries), len(entries)
        else:
            from affordvla.data.robopoint import pointing_samples

            if not args.images:
                raise ValueError("convert robopoint needs --images (the folder its image paths are relative to)")
            loaded, _ = pointing_samples(args.source, args.images)
            samples, total = iter(loaded), len(loaded)
        return convert_keypoints(samples, args.out, source=str(args.source), source_format=args.source_format,
                                 total=total)
    if args.source_format == "rlbench":
        return convert(rlbench_episodes(args.source, tuple(args.cameras)), args.out, source=str(args.source),
                       source_format="rlbench")
    if not args.name:
        raise ValueError("convert oxe needs --name (the RLDS dataset folder, e.g. bridge_orig)")
    return convert(oxe_episodes(args.source, args.name, args.split), args.out,
                   source=f"{args.source}/{args.name}:{args.split}", source_format="oxe")


@console_command("affordvla-data")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "kalie-from-hdf5":
            counts = hdf5_to_json(args.data_dir, args.out_dir, on_error=args.on_error,
                                  write_str_format=not args.no_str_format)
            print(json.dumps(counts))
        elif args.command == "convert":
            print(json.dumps(_convert(args)))
    except (ValueError, FileNotFoundError) as exc:  # every format error of the readers is a ValueError
        print(f"affordvla-data: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
