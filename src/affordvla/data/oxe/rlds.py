"""RLDS datasets as TFDS writes them, read without TensorFlow.

A dataset lives in `<root>/<folder>/<version>/` with `dataset_info.json`, `features.json` and shards
`<name>-<split>.tfrecord-NNNNN-of-MMMMM`, where `<name>` is dataset_info.json's `name` (OpenVLA's `bridge_orig`
download holds `bridge_dataset-*` shards). Opening a dataset checks, before any episode is decoded, that every
shard its splits list is there and holds the `shardLengths` episodes (counted from the record framing), and that
features.json has every key the dataset's standardisation reads. Each record is one episode with flattened step
features (`steps/action`, `steps/observation/image_0`, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affordvla.data.oxe.specs import SPECS, DatasetSpec
from affordvla.data.oxe.transforms import Episode, OXEFormatError, episode_instruction, standardize
from affordvla.data.tfrecord import TFRecordError, count_records, parse_example_record, read_records

log = logging.getLogger(__name__)
TRAIN_FRACTION_WITHOUT_VAL = 0.95  # datasets without a "val" split: train[:95%] for training, train[95%:] to validate
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def spec_for(folder: str, where: Path | str = "") -> DatasetSpec:
    if folder not in SPECS:
        raise OXEFormatError(f"dataset {folder!r}{' (' + str(where) + ')' if where else ''} has no standardisation; "
                             f"known datasets: {sorted(SPECS)}")
    return SPECS[folder]


def read_features(path: Path, dataset: str = "") -> dict[str, tuple[str, tuple[int, ...]]]:
    """TFDS's features.json -> {flattened key: (kind, shape)}, kind being image, text or the tensor dtype."""
    where = f"dataset {dataset}: {path}" if dataset else str(path)
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OXEFormatError(f"{where} does not exist") from None
    except json.JSONDecodeError as exc:
        raise OXEFormatError(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    flat: dict[str, tuple[str, tuple[int, ...]]] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            raise OXEFormatError(f"{where}: {prefix.rstrip('/') or 'the top level'} is a {type(node).__name__}, "
                                 "expected a JSON object (a TFDS feature)")
        if "featuresDict" in node:
            children = _field(node["featuresDict"], "features", dict, f"{where}: {prefix}featuresDict", default={})
            for key, child in children.items():
                walk(child, f"{prefix}{key}/")
        elif "sequence" in node:  # the steps dataset: its per-step features
            walk(_field(node["sequence"], "feature", dict, f"{where}: {prefix}sequence"), prefix)
        else:
            body = node.get("image") or node.get("tensor") or {}
            kind = "image" if "image" in node else "text" if "text" in node else body.get("dtype", "unknown")
            dims = body.get("shape", {}).get("dimensions", []) if isinstance(body, dict) else None
            try:
                shape = tuple(int(d) for d in dims)
            except (TypeError, ValueError):
                raise OXEFormatError(f"{where}: {prefix.rstrip('/')} has shape dimensions {dims!r}, expected a "
                                     "list of integers") from None
            flat[prefix.rstrip("/")] = (kind, shape)

    walk(root, "")
    return flat


_MISSING = object()


def _field(node: Any, key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    """node[key] checked to be a `kind`, else an OXEFormatError naming `where` (dataset and file)."""
    if not isinstance(node, dict):
        raise OXEFormatError(f"{where} is a {type(node).__name__}, expected a JSON object")
    if key not in node:
        if default is not _MISSING:
            return default
        raise OXEFormatError(f"{where} lacks {key!r}")
    value = node[key]
    if not isinstance(value, kind):
        raise OXEFormatError(f"{where}: {key!r} is {value!r}, expected a {kind.__name__}")
    return value


@dataclass
class RLDSDataset:
    """One RLDS dataset folder, its shards checked against dataset_info.json at `open`."""

    name: str  # the folder's name, which selects the standardisation
    tfds_name: str  # dataset_info.json's name, the shards' prefix
    path: Path  # <root>/<folder>/<version>
    splits: dict[str, list[Path]]  # split -> shards in order
    lengths: dict[str, list[int]]  # split -> episodes per shard
    info: dict[str, Any]
    spec: DatasetSpec

    @classmethod
    def open(cls, root: str | Path, name: str, version: str | None = None) -> RLDSDataset:
        base = Path(root) / name
        spec = spec_for(name, base)
        if not base.is_dir():
            raise OXEFormatError(f"dataset {name}: RLDS folder {base} does not exist")
        if version is None:
            versions = sorted((p for p in base.iterdir() if p.is_dir()),
                              key=lambda p: tuple(int(x) if x.isdigit() else -1 for x in p.name.split(".")))
            if not versions:
                raise OXEFormatError(f"dataset {name}: {base} holds no version folders")
            path = versions[-1]
        else:
            path = base / version
        info_path = path / "dataset_info.json"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OXEFormatError(f"dataset {name}: {info_path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise OXEFormatError(f"dataset {name}: {info_path}: invalid JSON ({exc.msg} at line "
                                 f"{exc.lineno})") from None
        if not isinstance(info, dict):
            raise OXEFormatError(f"dataset {name}: {info_path} is a JSON {type(info).__name__}, expected an object")
        features = read_features(path / "features.json", name)
        missing = [f"steps/{k}" for k in spec.required_keys() if f"steps/{k}" not in features]
        if missing:
            raise OXEFormatError(f"dataset {name}: {path / 'features.json'} lacks {missing}, which its "
                                 "standardisation reads")
        for key in spec.required_keys():
            kind, shape = features[f"steps/{key}"]
            want = spec.feature_shapes[key]
            if kind not in ("image", "text") and shape != want:
                raise OXEFormatError(f"dataset {name}: {path / 'features.json'}: steps/{key} has shape {list(shape)}, "
                                     f"the standardisation expects {list(want)}")
        tfds_name = _field(info, "name", str, f"dataset {name}: {info_path}", default="") or name
        splits, lengths = cls._check_shards(name, tfds_name, path, info)
        return cls(name, tfds_name, path, splits, lengths, info, spec)

    @staticmethod
    def _check_shards(folder: str, tfds_name: str, path: Path, info: dict) -> tuple[dict, dict]:
        """Every shard dataset_info.json lists, present and holding its shardLengths episodes."""
        where = f"dataset {folder}: {path / 'dataset_info.json'}"
        file_format = _field(info, "fileFormat", str, where, default="tfrecord")
        if file_format != "tfrecord":
            raise OXEFormatError(f"{where}: fileFormat {file_format!r}; only tfrecord is read")
        entries = _field(info, "splits", list, where, default=[])
        if not entries:
            raise OXEFormatError(f"{where} lists no splits")
        splits, lengths = {}, {}
        for position, entry in enumerate(entries):
            split = _field(entry, "name", str, f"{where}: splits[{position}]")
            raw = _field(entry, "shardLengths", list, f"{where}: split {split!r}", default=[])
            try:  # TFDS writes the counts as decimal strings
                counts = [int(n) for n in raw]
            except (TypeError, ValueError):
                raise OXEFormatError(f"{where}: split {split!r} has shardLengths {raw!r}, expected episode "
                                     "counts (integers)") from None
            if not counts or min(counts) < 0:
                raise OXEFormatError(f"{where}: split {split!r} has no shardLengths" if not counts else
                                     f"{where}: split {split!r} has negative shardLengths {raw!r}")
            template = _field(entry, "filepathTemplate", str, f"{where}: split {split!r}", default=SHARD_TEMPLATE)
            files = []
            for index, expected in enumerate(counts):
                shard = path / (template.replace("{DATASET}", tfds_name).replace("{SPLIT}", split)
                                .replace("{FILEFORMAT}", file_format)
                                .replace("{SHARD_X_OF_Y}", f"{index:05d}-of-{len(counts):05d}"))
                if not shard.is_file():
                    present = sorted(p.name for p in path.glob(f"*-{split}.{file_format}-*"))[:4]
                    raise OXEFormatError(f"dataset {folder}: shard {shard} is missing ({len(counts)} listed in "
                                         f"dataset_info.json; present: {present})")
                try:
                    found = count_records(shard)
                except TFRecordError as exc:
                    raise OXEFormatError(f"dataset {folder}: {exc}") from None
                if found != expected:
                    raise OXEFormatError(f"dataset {folder}: shard {shard} holds {found} episodes, dataset_info.json "
                                         f"says {expected} (truncated or partial download?)")
                files.append(shard)
            splits[split], lengths[split] = files, counts
        return splits, lengths

    def content_hash(self) -> str:
        """Hash of the metadata files and every shard's name and size: the key of cached statistics."""
        digest = hashlib.sha256()
        for meta in ("dataset_info.json", "features.json"):
            digest.update((self.path / meta).read_bytes())
        for split in sorted(self.splits):
            for shard in self.splits[split]:
                digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
        return digest.hexdigest()[:16]

    def shard_lengths(self, split: str) -> list[int]:
        """Episodes per shard, from dataset_info.json's shardLengths (checked against the files at open)."""
        return self.lengths[split]

    def episode_records(self, split: str, *, rank: int = 0, world_size: int = 1) -> Iterator[tuple[str, bytes]]:
        """(where, serialized Example) for the episodes of a logical split ('train' or 'val'), restricted to this
        consumer's share (consumers = distributed ranks x loader workers). With at least as many shards as
        consumers, shard i goes to consumer i mod world_size (each reads whole shards only). With fewer, shard
        i is shared by consumers i, i + n, i + 2n, ... (n shards), which take its records in turn; either way the
        shares are disjoint and together cover the split. Without a stored 'val' split, the stored train split is
        cut as TFDS's train[:95%] / train[95%:] (by global episode index)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"consumer {rank} is outside {world_size} consumers")
        if split in self.splits:
            stored, keep = split, None
        elif split == "val" and "train" in self.splits:
            stored, keep = "train", "val"
        else:
            raise OXEFormatError(f"dataset {self.name}: {self.path}: no split {split!r}; has {sorted(self.splits)}")
        if keep is None and split == "train" and "val" not in self.splits:
            keep = "train"
        lengths = self.lengths[stored]
        boundary = round(TRAIN_FRACTION_WITHOUT_VAL * sum(lengths))
        shards = len(self.splits[stored])
        if world_size <= shards:  # whole shards dealt out
            mine, turn, turns = lambda i: i % world_size == rank, 0, 1
        else:  # consumers rank % n, rank % n + n, ... share shard rank % n, taking its records in turn
            sharing = range(rank % shards, world_size, shards)
            mine, turn, turns = lambda i: i == rank % shards, sharing.index(rank), len(sharing)
        first = 0
        for shard_index, (shard, length) in enumerate(zip(self.splits[stored], lengths)):
            start, first = first, first + length
            if not mine(shard_index):
                continue
            for index, data in enumerate(read_records(shard)):
                if index % turns != turn:
                    continue
                position = start + index
                if keep == "train" and position >= boundary or keep == "val" and position < boundary:
                    continue
                yield f"{shard}, record {index}", data

    def episodes(self, split: str, *, rank: int = 0, world_size: int = 1, on_error: str = "raise",
                 skipped: list[str] | None = None, skip_unlabeled: bool = True,
                 unlabeled: list[str] | None = None, image_size: int | None = None,
                 cameras: tuple[str, ...] = ("primary",), decode_images: bool = True) -> Iterator[Episode]:
        """Standardised episodes. Episodes without an instruction are left out when `skip_unlabeled` (OpenVLA's
        default), their locations appended to `unlabeled`. With on_error="skip", bad episodes are left out and
        their locations appended to `skipped`; the shard framing must still be intact to go on reading."""
        left_out = 0
        for where, data in self.episode_records(split, rank=rank, world_size=world_size):
            try:
                features = parse_example_record(data, where)
                if skip_unlabeled and not episode_instruction(self.spec, features):
                    left_out += 1
                    if unlabeled is not None:
                        unlabeled.append(where)
                    continue
                episode = standardize(self.spec, features, where, image_size=image_size, cameras=cameras,
                                      decode_images=decode_images)
                if not np.isfinite(episode.actions).all():
                    bad = sorted(set(np.nonzero(~np.isfinite(episode.actions))[0].tolist()))
                    raise OXEFormatError(f"{where}: dataset {self.name}: NaN or infinite actions at steps {bad[:10]}")
            except (OXEFormatError, TFRecordError) as exc:
                if on_error != "skip" or isinstance(exc, TFRecordError) and "checksum" in str(exc):
                    raise
                log.warning("skipping %s", exc)
                if skipped is not None:
                    skipped.append(where)
                continue
            yield episode
        if left_out:
            log.info("dataset %s, split %s: %d episodes without language left out", self.name, split, left_out)

    def action_statistics(self, cache_dir: str | Path | None = None, *, skip_unlabeled: bool = True) -> dict[str, Any]:
        """q01 / q99 / mean / std / min / max of the standardised training actions (frames not decoded), cached
        in `cache_dir` under the dataset's content hash; without `cache_dir` computed and not stored (the dataset
        folder is the user's and is never written to)."""
        content_hash = self.content_hash()
        suffix = "" if skip_unlabeled else "_all"
        cache = Path(cache_dir) / f"affordvla_action_stats_{content_hash}{suffix}.json" if cache_dir else None
        if cache is not None and cache.is_file():
            return json.loads(cache.read_text())
        episodes = list(self.episodes("train", skip_unlabeled=skip_unlabeled, decode_images=False))
        if not episodes:
            raise OXEFormatError(f"dataset {self.name}: {self.path}: no training episodes to compute statistics from")
        actions = np.concatenate([e.actions for e in episodes])
        stats = {"dataset": self.name, "count": len(actions), "episodes": len(episodes), "hash": content_hash,
                 "q01": np.quantile(actions, 0.01, axis=0).tolist(), "q99": np.quantile(actions, 0.99, axis=0).tolist(),
                 "mean": actions.mean(0).tolist(), "std": actions.std(0).tolist(),
                 "min": actions.min(0).tolist(), "max": actions.max(0).tolist()}
        if cache is None:
            return stats
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        tmp.replace(cache)
        return stats


# ------------------------------------------------------------------------------------------- fixture writer


def _feature_json(kind: str, shape: tuple[int, ...]) -> dict:
    """One leaf of features.json as TFDS writes it."""
    if kind == "image":
        return {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
                "image": {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": "uint8", "encodingFormat": "jpeg"}}
    if kind == "text":
        return {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}
    dtype = {"float": "float32", "int": "int32", "int64": "int64", "bool": "bool"}[kind]
    return {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
            "tensor": {"shape": {"dimensions": [str(d) for d in shape]} if shape else {}, "dtype": dtype,
                       "encoding": "none"}}


def _features_dict(leaves: dict[str, dict]) -> dict:
    """{"a/b": leaf} -> nested TFDS FeaturesDict JSON."""
    tree: dict = {}
    for key, leaf in leaves.items():
        node = tree
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf

    def build(node: dict) -> dict:
        features = {k: v if "pythonClassName" in v else build(v) for k, v in node.items()}
        return {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                "featuresDict": {"features": features}}

    return build(tree)


def features_json(step_features: dict[str, tuple[str, tuple[int, ...]]],
                  episode_features: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> dict:
    """features.json for the given per-step and per-episode features ({key: (kind, shape)}), in TFDS's layout:
    the steps are a Dataset feature of a FeaturesDict."""
    steps = _features_dict({k: _feature_json(*v) for k, v in step_features.items()})
    top = {"steps": {"pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
                     "sequence": {"feature": steps, "length": "-1"}}}
    if episode_features:
        top["episode_metadata"] = _features_dict({k: _feature_json(*v) for k, v in episode_features.items()})
    return {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
            "featuresDict": {"features": top}}


def _infer_step_features(episode: dict, spec: DatasetSpec | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    steps = next((len(v) for k, v in episode.items() if k.startswith("steps/") and isinstance(v, list)), 1)
    out = {}
    for name, values in episode.items():
        if not name.startswith("steps/"):
            continue
        key = name[len("steps/"):]
        declared = {f.key: f for f in spec.features} if spec else {}
        if key in declared:
            out[key] = (declared[key].kind, declared[key].shape)
        elif isinstance(values, list):
            out[key] = ("image" if values and bytes(values[0][:2]) == b"\xff\xd8" else "text", ())
        else:
            per_step = np.asarray(values).size // max(steps, 1)
            kind = "float" if np.asarray(values).dtype.kind == "f" else "int"
            out[key] = (kind, (per_step,) if per_step != 1 else ())
    return out


def write_rlds_dataset(root: str | Path, name: str, episodes_by_split: dict[str, list[dict[str, Any]]], *,
                       version: str = "1.0.0", shards: int = 2, tfds_name: str | None = None) -> Path:
    """Write episodes (dicts of flattened Example features) as TFDS writes an RLDS dataset: dataset_info.json,
    features.json and `<tfds name>-<split>.tfrecord-NNNNN-of-MMMMM` shards in `root/name/version`, episodes
    dealt round-robin to shards. The TFDS name defaults to the one the dataset is published under."""
    from affordvla.data.tfrecord import encode_example, write_records

    spec = SPECS.get(name)
    tfds_name = tfds_name or (spec.tfds_name if spec and spec.tfds_name else name)
    path = Path(root) / name / version
    path.mkdir(parents=True, exist_ok=True)
    split_info, step_features = [], {}
    for split, episodes in episodes_by_split.items():
        lengths, sizes = [], 0
        for shard in range(shards):
            mine = episodes[shard::shards]
            file = write_records(path / f"{tfds_name}-{split}.tfrecord-{shard:05d}-of-{shards:05d}",
                                 (encode_example(e) for e in mine))
            lengths.append(len(mine))
            sizes += file.stat().st_size
        for episode in episodes:
            step_features.update(_infer_step_features(episode, spec))
        split_info.append({"name": split, "numBytes": str(sizes), "shardLengths": [str(n) for n in lengths],
                           "filepathTemplate": SHARD_TEMPLATE})
    (path / "dataset_info.json").write_text(json.dumps(
        {"name": tfds_name, "version": version, "fileFormat": "tfrecord", "moduleName": f"{tfds_name}.{tfds_name}",
         "releaseNotes": {version: "Initial release."}, "splits": split_info}, indent=2))
    (path / "features.json").write_text(json.dumps(features_json(step_features), indent=2))
    return path
