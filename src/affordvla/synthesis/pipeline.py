"""KALIE's synthesis stage over a whole dataset: N originals in, N originals + N x K synthetic entries out.

Output entries are numbered as KALIE numbers them (each original, then its K variants). The plan (which output
key holds which source entry and variant, and each variant's seed) is fixed before anything is written, so an
interrupted run resumes where it stopped and ends byte-identical to an uninterrupted one. Variants are drawn
only for the entries of the chosen splits (the training split when the stage feeds `affordvla-train`); the
other entries are copied, so evaluation never sees a synthetic view of its own scenes.

`apply_synthesis` is the hook `affordvla-train` calls: with a synthesis recipe configured it writes the
synthesised dataset (once; reruns find it complete) and points the datamodule at it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from affordvla.data.kalie import (
    JSON_NAME,
    SCALE,
    SPLITS_FILE,
    KalieEntry,
    KalieFormatError,
    kalie_split,
    load_kalie_sample,
    read_kalie_index,
)
from affordvla.locking import exclusive
from affordvla.synthesis.recipe import KalieRecipe, derive_seed
from affordvla.synthesis.writer import (
    SynthesisWriter,
    atomic_write,
    png_bytes,
)

log = logging.getLogger(__name__)
FORMAT = "affordvla.kalie_synthesis/1"
POINT_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (240, 50, 230)]


class SynthesisError(RuntimeError):
    """A sample could not be synthesised; the message names the source file, the entry and the variant."""


@dataclass
class PlannedItem:
    """One sample the synthesis plans to write: an original copied, or a variant of it with its seed."""

    key: str  # output key
    source: KalieEntry
    variant: int | None  # None: the original, copied
    seed: int | None


@dataclass
class SynthesisResult:
    """What a synthesis call did: where the dataset lies, how many samples of each kind, and the time it took."""

    root: Path
    entries: int
    originals: int
    synthetic: int
    written: int  # samples written by this call (0 when the dataset was already complete)
    seconds: float
    backend_seconds: float


# ------------------------------------------------------------------------------------------------ planning


def _source_splits(root: Path, keys: list[str], splits: Sequence[str] | None, split_seed: int,
                   train_fraction: float) -> dict[str, list[str]] | None:
    """The source's split of its keys: its splits.json, else KALIE's seeded split when splits are asked for."""
    path = root / SPLITS_FILE
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise KalieFormatError(f"{path}: must map split names to lists of entry keys")
        known = set(keys)
        # entries skipped by on_error=skip drop out of their split, as the datamodule drops them
        return {name: [k for k in ks if k in known] for name, ks in data.items()}
    if splits is None:
        return None
    train, test = kalie_split(keys, seed=split_seed, train_fraction=train_fraction)
    return {"train": train, "val": test, "test": test}  # KALIE's validation set is its test set


def plan(entries: list[KalieEntry], varied: set[str], num_variants: int, seed: int) -> list[PlannedItem]:
    items: list[PlannedItem] = []
    for entry in entries:
        items.append(PlannedItem(f"entry_{len(items)}", entry, None, None))
        if entry.key in varied:
            for i in range(num_variants):
                items.append(PlannedItem(f"entry_{len(items)}", entry, i, derive_seed(seed, entry.key, i)))
    return items


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_parameters(source: Path, recipe: KalieRecipe, splits: Sequence[str] | None,
                   source_splits: dict[str, list[str]] | None) -> dict[str, Any]:
    """What identifies a run: the source's index and split, the recipe's parameters and its models."""
    split_file = source / SPLITS_FILE
    return {
        "format": FORMAT,
        "source": {"root": str(source.resolve()), "index_sha256": _file_sha256(source / JSON_NAME),
                   "splits_sha256": _file_sha256(split_file) if split_file.is_file() else None},
        "varied_splits": list(splits) if splits is not None else None,
        "source_split_sizes": {k: len(v) for k, v in source_splits.items()} if source_splits else None,
        "recipe": recipe.parameters(),
        "models": recipe.models(),
    }


def parameters_digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ preview


def write_preview(path: Path, rows: list[list[tuple[np.ndarray, dict[str, Sequence[int]], str]]],
                  tile: int = 192) -> None:
    """A grid: one row per source entry (its original, then its variants) with the keypoints drawn as rings."""
    columns = max((len(r) for r in rows), default=1)
    grid = Image.new("RGB", (tile * columns, tile * max(1, len(rows)) + 16), (255, 255, 255))
    radius = max(3, tile // 48)
    for r, row in enumerate(rows):
        for c, (image, points, caption) in enumerate(row):
            thumb = Image.fromarray(image).convert("RGB").resize((tile, tile), Image.BICUBIC)
            draw = ImageDraw.Draw(thumb)
            for k, (x, y) in enumerate(points.values()):
                px, py = x / SCALE * tile, y / SCALE * tile
                draw.ellipse([px - radius, py - radius, px + radius, py + radius],
                             outline=POINT_COLOURS[k % len(POINT_COLOURS)], width=2)
            draw.rectangle([0, tile - 13, tile, tile], fill=(0, 0, 0))
            draw.text((3, tile - 12), caption[:40], fill=(255, 255, 255))
            grid.paste(thumb, (c * tile, r * tile))
    draw = ImageDraw.Draw(grid)
    x = 4
    for k, name in enumerate(("Grasp", "Function", "Target", "Pre-contact", "Post-contact")):
        draw.rectangle([x, tile * len(rows) + 3, x + 10, tile * len(rows) + 13], fill=POINT_COLOURS[k])
        draw.text((x + 14, tile * len(rows) + 2), name, fill=(0, 0, 0))
        x += 24 + 7 * len(name)
    data = png_bytes(np.asarray(grid))
    atomic_write(path, lambda f: f.write(data), mode="wb")


# ------------------------------------------------------------------------------------------------ the stage


def _write_all(output: Path, params: dict[str, Any], items: list[PlannedItem], recipe: KalieRecipe,
               source_splits: dict[str, list[str]] | None, skipped: int, index_every: int, preview_rows: int,
               progress: bool) -> int | None:
    """Write every planned sample not yet in `output` and finish the dataset; None when it was complete."""
    writer = SynthesisWriter(output, params, index_every=index_every)
    if writer.is_complete():
        return None
    by_source: dict[str, list[PlannedItem]] = {}
    for item in items:
        by_source.setdefault(item.source.key, []).append(item)
    written = 0
    with tqdm(total=len(items), initial=sum(writer.done(i.key) for i in items), unit="sample",
              desc=f"KALIE synthesis -> {output}", disable=not progress) as bar:
        for group in by_source.values():
            todo = [item for item in group if not writer.done(item.key)]
            if not todo:
                continue
            written += _synthesise_group(writer, recipe, group[0].source, todo)
            bar.update(len(todo))
    manifest = _manifest(params, items, writer, skipped)
    out_splits = None
    if source_splits is not None:
        new_keys: dict[str, list[str]] = {}
        for item in items:
            if item.key not in writer.rejected:
                new_keys.setdefault(item.source.key, []).append(item.key)
        out_splits = {name: [k for key in keys for k in new_keys.get(key, [])] for name, keys in source_splits.items()}
    writer.finish([i.key for i in items], out_splits, manifest,
                  preview=lambda path: _preview(path, writer, items, preview_rows))
    return written


def synthesize_dataset(source: str | Path, output: str | Path, recipe: KalieRecipe, *,
                       splits: Sequence[str] | None = None, split_seed: int = 2023, train_fraction: float = 0.8,
                       on_error: str = "raise", preview_rows: int = 4, index_every: int = 50,
                       progress: bool = True) -> SynthesisResult:
    """Write originals + synthetic variants of the KALIE dataset at `source` into `output`.

    `splits`: the source splits whose entries get variants (None: every entry, as KALIE does). The output's
    splits.json puts each variant in its original's split. Rerunning resumes an interrupted run and returns at
    once when the run is complete; a folder holding another run is refused.
    """
    started = time.perf_counter()
    backend_before = recipe.backend_seconds
    source, output = Path(source), Path(output)
    entries, skipped = read_kalie_index(source, on_error=on_error)
    if not entries:
        raise KalieFormatError(f"{source / JSON_NAME}: no entries to synthesise from")
    source_splits = _source_splits(source, [e.key for e in entries], splits, split_seed, train_fraction)
    if splits is None:
        varied = {e.key for e in entries}
    else:
        unknown = sorted(set(splits) - set(source_splits or {}))
        if unknown:
            raise KalieFormatError(f"{source / SPLITS_FILE}: no split named {unknown}; it has "
                                   f"{sorted(source_splits or {})}")
        varied = {k for name in splits for k in source_splits[name]}
    items = plan(entries, varied, recipe.num_variants, recipe.seed)
    params = run_parameters(source, recipe, splits, source_splits)
    # one writer per output folder: parallel jobs of a sweep with the same recipe wait here, then reuse the result
    with exclusive(output):
        written = _write_all(output, params, items, recipe, source_splits, skipped, index_every, preview_rows,
                             progress)
    n_synthetic = sum(item.variant is not None for item in items)
    if written is None:  # complete before this call
        return SynthesisResult(output, len(items), len(entries), n_synthetic, 0, time.perf_counter() - started, 0.0)
    seconds = time.perf_counter() - started
    log.info("synthesised %d samples (%d entries in all) into %s in %.1f s", written, len(items), output, seconds)
    return SynthesisResult(output, len(items), len(entries), n_synthetic, written, seconds,
                           recipe.backend_seconds - backend_before)


def _synthesise_group(writer: SynthesisWriter, recipe: KalieRecipe, entry: KalieEntry,
                      todo: list[PlannedItem]) -> int:
    """The original and the variants of one source entry: image, masks and descriptions are read once."""
    where = f"{entry.source}, entry {entry.key!r}"
    image = load_kalie_sample(entry).image
    try:
        masks = recipe.entry_masks(entry, image)
    except KalieFormatError:
        raise  # already names the file and the entry
    except Exception as exc:  # a detector or a mask file failing: say which entry
        raise SynthesisError(f"{where}: finding the object masks failed: {exc}") from exc
    descriptions, new_descriptions = recipe.descriptions(entry, image)
    missing = [o for o in entry.objects if o not in masks]
    if missing:
        log.warning("%s: no mask for %s; those objects stay as they are", where, missing)
    written = 0
    for item in todo:
        if item.variant is None:
            other = dict(entry.other)
            if new_descriptions:  # cached back into the entry, as KALIE does, so reruns need no LLM
                other["prompts"] = descriptions
            original = entry.image_path.read_bytes() if entry.image_path.suffix.lower() == ".png" else image
            writer.write(item.key, original, entry.points, other, masks,
                         {"source": entry.key, "variant": None, "missing_objects": missing})
        else:
            variant, seed, attempts = _filtered_variant(recipe, entry, image, masks, descriptions, item, where)
            if variant is None:  # the image filter refused every attempt: the entry is left out, and recorded
                writer.reject(item.key, {"source": entry.key, "variant": item.variant, "attempts": attempts})
                continue
            other = {**entry.other, "prompts": descriptions, "prompt": variant.record["prompt"],
                     "synthesis": {"source": entry.key, "variant": item.variant, "seed": seed}}
            record = {"source": entry.key, **variant.record, "missing_objects": missing, "filter_attempts": attempts}
            writer.write(item.key, variant.image, variant.points, other, variant.masks, record)
        written += 1
    return written


def _filtered_variant(recipe: KalieRecipe, entry: KalieEntry, image: np.ndarray, masks: dict, descriptions: dict,
                      item: PlannedItem, where: str):
    """(variant, its seed, attempts): the planned seed first; while the image filter refuses, seeds derived from
    it, up to `recipe.filter_attempts`. The variant is None when every attempt was refused."""
    attempts = recipe.filter_attempts if recipe.image_filter is not None else 1
    for attempt in range(attempts):
        seed = item.seed if attempt == 0 else derive_seed(item.seed, "filter", attempt)
        try:
            variant = recipe.variant(image, entry.points, masks, descriptions, item.variant, seed)
            if recipe.image_filter is None or recipe.image_filter.keep(variant.image, entry.other.get("task", ""),
                                                                       list(entry.objects)):
                return variant, seed, attempt + 1
        except Exception as exc:
            raise SynthesisError(f"{where}, variant {item.variant} (seed {seed}): {exc}") from exc
    return None, None, attempts


def _manifest(params: dict[str, Any], items: list[PlannedItem], writer: SynthesisWriter, skipped: int) -> dict:
    records = {item.key: writer.entries[item.key]["record"] for item in items if item.key in writer.entries}
    synthetic = [r for r in records.values() if r.get("variant") is not None]
    return {
        **params,
        "counts": {
            "originals": sum(item.variant is None for item in items), "synthetic": len(synthetic),
            "entries": len(records),
            "source_entries_skipped": skipped,
            "objects_moved": sum(len(r["objects"]) for r in synthetic),
            "objects_without_mask": sum(len(r["missing_objects"]) for r in synthetic),
            "clamped_coordinates": sum(r["clamped_coordinates"] for r in synthetic),
            "affine_redraws": sum(o["tries"] - 1 for r in synthetic for o in r["objects"].values()),
            "filter_redraws": sum(r.get("filter_attempts", 1) - 1 for r in synthetic),
            "filter_rejected": len(writer.rejected),
        },
        "rejected": dict(writer.rejected),
        "entries": records,
    }


def _preview(path: Path, writer: SynthesisWriter, items: list[PlannedItem], rows: int) -> None:
    groups: dict[str, list[PlannedItem]] = {}
    for item in items:
        if item.key in writer.entries:  # not the variants the image filter left out
            groups.setdefault(item.source.key, []).append(item)
    chosen = [g for g in groups.values() if len(g) > 1][:rows] or list(groups.values())[:rows]
    grid = []
    for group in chosen:
        row = []
        for item in group[:5]:
            entry = writer.entries[item.key]["entry"]
            with Image.open(writer.root / entry["img"]) as im:
                image = np.asarray(im.convert("RGB"))
            points = json.loads(entry["points"])
            caption = f"{item.key} <- {item.source.key}" + ("" if item.variant is None else f" v{item.variant}")
            row.append((image, points, caption))
        grid.append(row)
    write_preview(path, grid)


# ------------------------------------------------------------------------------------------------ Hydra glue


def build_recipe(cfg: Any) -> KalieRecipe:
    from hydra.utils import instantiate

    tiny = cfg.get("tiny_models")
    if tiny:  # the offline stand-in checkpoints the model paths point into, written once by the writer it names
        if "_target_" not in tiny:
            raise ValueError("synthesis.tiny_models must name the writer of the stand-in checkpoints by _target_ "
                             "(e.g. affordvla.offline.tiny_synthesis.ensure_tiny_models), or be null for real "
                             f"checkpoints only; got {tiny}")
        instantiate(tiny, _convert_="all")
    recipe = instantiate(cfg.recipe, _convert_="all")
    if not isinstance(recipe, KalieRecipe):
        raise TypeError(f"synthesis.recipe must build a KalieRecipe, got {type(recipe).__name__}")
    return recipe


def synthesize_from_config(cfg: Any, source: str | Path, *, split_seed: int = 2023, train_fraction: float = 0.8
                           ) -> SynthesisResult:
    """Run the `synthesis` config group on the dataset at `source`. The output folder is `cfg.output_dir`, or
    `<cfg.output_root>/<source folder>-<cfg.name>-<digest of the run's parameters>`, so a changed recipe or
    source writes a new folder and an unchanged one is reused."""
    recipe = build_recipe(cfg)
    source = Path(source)
    splits = list(cfg.splits) if cfg.get("splits") is not None else None
    output = cfg.get("output_dir")
    if not output:
        if not (source / JSON_NAME).is_file():
            raise KalieFormatError(f"{source / JSON_NAME}: file not found (the dataset to synthesise from)")
        entries, _ = read_kalie_index(source, on_error=cfg.get("on_error", "raise"))
        source_splits = _source_splits(source, [e.key for e in entries], splits, split_seed, train_fraction)
        digest = parameters_digest(run_parameters(source, recipe, splits, source_splits))
        output = Path(cfg.output_root) / f"{source.name}-{cfg.name}-{digest}"
    return synthesize_dataset(source, output, recipe, splits=splits, split_seed=split_seed,
                              train_fraction=train_fraction, on_error=cfg.get("on_error", "raise"),
                              preview_rows=cfg.get("preview_rows", 4), progress=cfg.get("progress", True))


def apply_synthesis(cfg: Any, datamodule: Any) -> Any:
    """`affordvla-train`'s hook: with a synthesis recipe in `cfg` (the `synthesis` group), prepare the source
    dataset, synthesise from it, and point the datamodule at the result; with `synthesis=none`, do nothing."""
    if cfg is None or cfg.get("recipe") is None:
        return datamodule
    if not hasattr(datamodule, "root"):
        raise ValueError(f"synthesis={cfg.get('name')} needs a KALIE-format keypoint dataset (one with a root "
                         f"folder); {type(datamodule).__name__} has none")
    datamodule.prepare_data()  # the generated toy dataset is written here when it is not on disk yet
    result = synthesize_from_config(cfg, datamodule.root, split_seed=getattr(datamodule, "split_seed", 2023),
                                    train_fraction=getattr(datamodule, "train_fraction", 0.8))
    log.info("training on the synthesised dataset %s (%d originals + %d synthetic)", result.root,
             result.originals, result.synthetic)
    datamodule.root = result.root
    datamodule.generate = None  # the synthesised folder is read as it is
    return datamodule
