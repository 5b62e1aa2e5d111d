"""KALIE's synthesis recipe with the offline compositing backend: geometry, the context formula, the dataset stage
(format, resume after a crash, manifest) and labels that stay on the moved objects."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affordvla.data.kalie import KalieFormatError, load_kalie_sample, read_kalie_index
from affordvla.formats.sample import KALIE_POINT_NAMES
from affordvla.offline.toy_kalie import ensure_toy_kalie
from affordvla.synthesis.annotators import make_annotator
from affordvla.synthesis.compositing import CompositingBackend
from affordvla.synthesis.dataset_masks import DatasetMasks
from affordvla.synthesis.geometry import (
    AffineRanges,
    compose_context,
    dilate,
    inpaint_mask,
    object_affine,
    sample_affine,
    transform_points,
    warp_image,
    warp_mask,
)
from affordvla.synthesis.interfaces import InpaintRequest
from affordvla.synthesis.pipeline import (
    SynthesisError,
    apply_synthesis,
    synthesize_dataset,
)
from affordvla.synthesis.recipe import KalieRecipe
from affordvla.synthesis.writer import SynthesisOutputError, SynthesisWriter

N, K = 4, 2


# ------------------------------------------------------------------------------------------------ geometry


def _marker(height, width, point):
    """Black image with a 3x3 white square centred on the pixel holding `point` (continuous pixel units)."""
    image = np.zeros((height, width), np.float32)
    col, row = int(point[0]), int(point[1])
    image[row - 1: row + 2, col - 1: col + 2] = 255
    return image, np.array([col + 0.5, row + 0.5])


def _centroid(image):
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return np.array([(cols * image).sum() / total + 0.5, (rows * image).sum() / total + 0.5])


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (700, 700)])
def test_markers_land_where_the_transformed_keypoints_say(size):
    """Random affines, drawn as the recipe draws them about random object regions (and with wider ranges): a
    marker drawn at a keypoint and resampled through the map is found within 1 px of the mapped keypoint."""
    width, height = size
    rng = np.random.default_rng(0)
    wide = AffineRanges(scale=(0.5, 1.6), rotation_degrees=180.0, translation_px=60.0)
    checked = 0
    for trial in range(40):
        mask = np.zeros((height, width), bool)
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        mask[y0: y0 + rng.integers(4, height // 2), x0: x0 + rng.integers(4, width // 2)] = True
        affine, _ = sample_affine(rng, mask, AffineRanges() if trial % 2 else wide)
        point = rng.uniform([0.25 * width, 0.25 * height], [0.75 * width, 0.75 * height])
        image, centre = _marker(height, width, point)
        expected = transform_points(centre, affine)[0]
        if not (np.all(expected >= 4) and np.all(expected <= [width - 4, height - 4])):
            continue  # a marker cut by the border has a biased centroid
        checked += 1
        found = _centroid(warp_image(image, affine))
        assert np.linalg.norm(found - expected) <= 1.0, (trial, found, expected)
        # the mask goes through the same map: the marker's silhouette lands on the same spot
        moved = warp_mask(image > 0, affine)
        assert moved.any() and np.linalg.norm(_centroid(moved.astype(np.float64)) - expected) <= 1.0
    assert checked >= 30


def test_affine_order_and_centre():
    """Scale, then rotate (counter-clockwise on screen for a positive angle), then translate, about the centre."""
    affine = object_affine((10.0, 20.0), (2.0, 1.0), 90.0, (3.0, -4.0))
    np.testing.assert_allclose(transform_points([10.0, 20.0], affine), [[13.0, 16.0]], atol=1e-9)
    # one step right of the centre: scaled to 2, turned 90 deg counter-clockwise on screen = up (y decreases)
    np.testing.assert_allclose(transform_points([11.0, 20.0], affine), [[13.0, 14.0]], atol=1e-9)


def test_context_composition_formula_on_hand_made_arrays():
    c = np.full((7, 7), 10, np.uint8)
    hc = np.full((7, 7), 200, np.uint8)
    m = np.zeros((7, 7), bool)
    m[1:4, 1:4] = True
    hm = np.zeros((7, 7), bool)
    hm[3:6, 3:6] = True
    # no erosion: (1 - m) * c + h(m) * h(c), the overlap pixel sums and saturates
    out = compose_context(c, hc, m, hm, erode_kernel=1)
    expected = np.where(m, 0, 10) + np.where(hm, 200, 0)
    np.testing.assert_array_equal(out, np.clip(expected, 0, 255))
    assert out[2, 2] == 0 and out[0, 0] == 10 and out[5, 5] == 210 and out[3, 3] == 200
    # 3x3 erosion: only each square's centre pixel survives in erode(m) and erode(h(m))
    out = compose_context(c, hc, m, hm, erode_kernel=3)
    expected = np.full((7, 7), 10)
    expected[2, 2] = 0
    expected[4, 4] = 210
    np.testing.assert_array_equal(out, expected)
    # RGB maps: the same formula per channel
    rgb = compose_context(np.dstack([c] * 3), np.dstack([hc] * 3), m, hm, erode_kernel=3)
    np.testing.assert_array_equal(rgb[..., 1], expected)


def test_inpaint_mask_is_the_dilated_union():
    m = np.zeros((9, 9), bool)
    m[2, 2] = True
    hm = np.zeros((9, 9), bool)
    hm[6, 6] = True
    out = inpaint_mask(m, hm, dilate_radius=1)
    assert out[2, 2] and out[6, 6] and out[1, 2] and out[7, 6] and out[2, 3]
    assert not out[4, 4] and out.sum() == 10  # two 5-pixel crosses (radius-1 disk)


def test_target_point_carries_pre_and_post_contact():
    recipe = KalieRecipe(CompositingBackend(), DatasetMasks(), keypoint_region="mask", keypoint_margin_px=0)
    mask = np.zeros((100, 100), bool)
    mask[40:60, 40:60] = True
    points = np.array([[10, 10], [50, 50], [45, 55], [90, 90], [5, 95]], np.float64)
    owners = recipe.keypoint_owners(points, {"bowl": mask})
    assert owners == [None, "bowl", "bowl", "bowl", "bowl"]
    points[2] = [80, 80]  # the Target Point outside: Pre/Post stay
    assert recipe.keypoint_owners(points, {"bowl": mask}) == [None, "bowl", None, None, None]


def test_compositing_changes_only_the_inpainting_region_and_is_seeded():
    rng = np.random.default_rng(0)
    image = np.full((48, 48, 3), 120, np.uint8) + rng.integers(0, 5, (48, 48, 3), dtype=np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[10:20, 10:22] = True
    image[mask] = (200, 30, 30)
    affine = object_affine((16.0, 15.0), (1.0, 1.0), 0.0, (15.0, 12.0))
    moved = warp_mask(mask, affine)
    region = inpaint_mask(mask, moved, 2)
    request = InpaintRequest(image=image, object_mask=mask, affine=affine, moved_mask=moved, inpaint_mask=region,
                             context=np.zeros_like(image), prompt="a bowl", seed=3)
    backend = CompositingBackend()
    out = backend.inpaint(request)
    np.testing.assert_array_equal(out[~region], image[~region])
    np.testing.assert_array_equal(out, backend.inpaint(request))  # same seed, same pixels
    assert np.abs(out[15, 15].astype(int) - 120).max() < 25  # the vacated place shows the table again
    assert not np.array_equal(out[moved], image[mask][: moved.sum()])  # recoloured
    shifted = CompositingBackend(hue_shift=0.0, saturation=(1, 1), value=(1, 1)).inpaint(request)
    np.testing.assert_allclose(shifted[29, 27:35], np.broadcast_to([200, 30, 30], (8, 3)), atol=3)  # moved as is


# ------------------------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "toy_kalie"
    return ensure_toy_kalie(root, seed=5, splits={"train": N, "val": 0, "test": 0}, image_size=64)


def _recipe(**kw) -> KalieRecipe:
    return KalieRecipe(CompositingBackend(), DatasetMasks(), make_annotator("softedge"), num_variants=K, seed=7,
                       **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(toy_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "out"
    result = synthesize_dataset(toy_source, out, _recipe(), progress=False)
    assert (result.originals, result.synthetic, result.entries, result.written) == (N, N * K, N + N * K, 12)
    return out


def test_n_originals_and_n_times_k_variants_in_kalie_format(uninterrupted, toy_source):
    entries, skipped = read_kalie_index(uninterrupted)
    assert skipped == 0 and len(entries) == N + N * K == 12
    assert [e.key for e in entries] == [f"entry_{i}" for i in range(12)]
    source, _ = read_kalie_index(toy_source)
    for i, src in enumerate(source):  # KALIE's numbering: each original, then its K variants
        original = entries[i * (K + 1)]
        assert original.points == src.points and original.image_path.read_bytes() == src.image_path.read_bytes()
        for entry in entries[i * (K + 1) + 1: (i + 1) * (K + 1)]:
            assert entry.other["synthesis"]["source"] == src.key
            assert entry.task == src.task and entry.objects == src.objects
            assert len(entry.other["prompt"]) == len(src.objects)
            assert entry.other["prompt"][0].endswith(", top down view, highres, best quality, photorealistic")
            sample = load_kalie_sample(entry)
            assert sample.image.shape == (64, 64, 3)
            assert not np.array_equal(sample.image, load_kalie_sample(src).image)
    strformat = json.loads((uninterrupted / "data_strformat.json").read_text())
    assert strformat["entry_1"]["points"].startswith("Grasp Point: (")
    assert (uninterrupted / "preview.png").is_file()
    assert Image.open(uninterrupted / "preview.png").size[0] >= 3 * 192


@pytest.mark.parametrize("crash", ["before_sample", "between_image_and_record"])
def test_kill_halfway_then_rerun_gives_the_same_bytes(uninterrupted, toy_source, tmp_path, monkeypatch, crash):
    """A run killed after the 5th sample (before the 6th starts, or after the 6th image was renamed into place but
    before its record) resumes to the same 12 entries, byte-identical to an uninterrupted run."""
    from affordvla.synthesis import writer as writer_module

    out = tmp_path / "out"
    real_write, real_atomic = SynthesisWriter.write, writer_module.atomic_write
    calls = {"samples": 0, "records": 0}

    def dying_write(self, *args, **kwargs):
        if calls["samples"] == 5:
            raise KeyboardInterrupt("simulated kill after the 5th sample")
        calls["samples"] += 1
        return real_write(self, *args, **kwargs)

    def dying_atomic(path, write, mode="w"):
        if path.parent.name == "entries":
            if calls["records"] == 5:
                raise KeyboardInterrupt("simulated kill between the 6th image and its record")
            calls["records"] += 1
        return real_atomic(path, write, mode)

    if crash == "before_sample":
        monkeypatch.setattr(SynthesisWriter, "write", dying_write)
    else:
        monkeypatch.setattr(writer_module, "atomic_write", dying_atomic)
    with pytest.raises(KeyboardInterrupt):
        synthesize_dataset(toy_source, out, _recipe(), progress=False, index_every=2)
    # what a reader sees after the crash: a valid partial dataset, every entry with its image
    partial, _ = read_kalie_index(out)
    assert 0 < len(partial) <= 5 and not (out / "manifest.json").exists()
    if crash == "between_image_and_record":
        assert (out / "imgs" / "entry_5.png").is_file() and "entry_5" not in {e.key for e in partial}
    monkeypatch.undo()
    result = synthesize_dataset(toy_source, out, _recipe(), progress=False)
    assert result.written == 12 - 5
    entries, _ = read_kalie_index(out)
    assert len(entries) == 12 and len({e.image_path for e in entries}) == 12
    assert _files(out) == _files(uninterrupted)
    again = synthesize_dataset(toy_source, out, _recipe(), progress=False)  # complete: nothing to do
    assert again.written == 0 and _files(out) == _files(uninterrupted)


def test_manifest_records_seeds_models_and_parameters(uninterrupted, toy_source):
    manifest = json.loads((uninterrupted / "manifest.json").read_text())
    recipe = _recipe()
    assert manifest["models"]["backend"] == CompositingBackend().describe()
    assert manifest["models"]["masks"]["masks"] == "dataset"
    assert manifest["models"]["annotator"] == json.loads(json.dumps(make_annotator("softedge").describe()))
    assert manifest["recipe"] == json.loads(json.dumps(recipe.parameters()))
    assert manifest["recipe"]["affine"]["scale"] == [0.8, 1.2] and manifest["recipe"]["num_variants"] == K
    assert manifest["source"]["root"] == str(toy_source.resolve())
    assert manifest["counts"]["originals"] == N and manifest["counts"]["synthetic"] == N * K
    entries, _ = read_kalie_index(uninterrupted)
    seeds = []
    for entry in entries:
        record = manifest["entries"][entry.key]
        if "synthesis" in entry.other:
            assert record["seed"] == entry.other["synthesis"]["seed"]
            assert record["variant"] == entry.other["synthesis"]["variant"]
            assert set(record["objects"]) == set(entry.objects)
            for obj in record["objects"].values():
                assert np.asarray(obj["affine"]).shape == (2, 3)
                assert 0.8 <= obj["drawn"]["sx"] <= 1.2 and abs(obj["drawn"]["angle"]) <= 20
            seeds.append(record["seed"])
        else:
            assert record["variant"] is None
    assert len(set(seeds)) == N * K


def test_keypoints_of_variants_lie_on_the_moved_objects(uninterrupted, toy_source):
    """Every keypoint that lay on an object's mask in the original lies on that object's moved mask (read back
    from the written mask files) in each variant; keypoints on no object keep their exact values."""
    source = {e.key: e for e in read_kalie_index(toy_source)[0]}
    checked = 0
    for entry in read_kalie_index(uninterrupted)[0]:
        if "synthesis" not in entry.other:
            continue
        src = source[entry.other["synthesis"]["source"]]
        image = load_kalie_sample(src).image
        size = image.shape[0]
        before = DatasetMasks().masks_for_entry(src, image, src.objects)
        after = DatasetMasks().masks_for_entry(entry, image, entry.objects)
        on_objects = set()
        for name in src.objects:
            for point in KALIE_POINT_NAMES:
                x, y = src.points[point]
                if before[name][min(size - 1, y * size // 1000), min(size - 1, x * size // 1000)]:
                    on_objects.add(point)
                    nx, ny = entry.points[point]
                    moved = dilate(after[name], 1)  # the 0-1000 rounding is worth 0.064 px here
                    assert moved[min(size - 1, ny * size // 1000), min(size - 1, nx * size // 1000)], (
                        entry.key, name, point)
                    checked += 1
        record_points = {p for o in json.loads((uninterrupted / "manifest.json").read_text())["entries"][
            entry.key]["objects"].values() for p in o["points"]}
        for point in set(KALIE_POINT_NAMES) - record_points:
            assert entry.points[point] == src.points[point]
        assert on_objects <= record_points
    assert checked >= N * K


def test_training_hook_varies_only_the_training_split(tmp_path):
    from omegaconf import OmegaConf

    from affordvla.data.datamodule import KalieDataModule
    from affordvla.data.generated import generated_name

    settings = {"seed": 2, "image_size": 48, "splits": {"train": 3, "val": 1, "test": 2}}
    toy = tmp_path / generated_name("kalie", settings)  # generated data goes only to a folder named by its settings
    generate = partial(ensure_toy_kalie, **settings)
    dm = KalieDataModule(str(toy), generate=generate)
    cfg = OmegaConf.create({"name": "kalie_compositing", "splits": ["train"], "output_root": str(tmp_path / "synth"),
                            "output_dir": None, "progress": False, "recipe": {
                                "_target_": "affordvla.synthesis.recipe.KalieRecipe", "num_variants": 2,
                                "backend": {"_target_": "affordvla.synthesis.compositing.CompositingBackend"},
                                "masks": {"_target_": "affordvla.synthesis.dataset_masks.DatasetMasks"}}})
    assert apply_synthesis(OmegaConf.create({"name": "none"}), dm) is dm and dm.generate is not None
    dm = apply_synthesis(cfg, dm)
    assert dm.generate is None and dm.root.parent == tmp_path / "synth"
    assert dm.root.name.startswith(f"{toy.name}-kalie_")
    dm.setup()
    assert {s: len(d) for s, d in dm.splits.items()} == {"train": 9, "val": 1, "test": 2}
    assert all("synthesis" not in e.other for s in ("val", "test") for e in dm.splits[s].entries)
    assert sum("synthesis" in e.other for e in dm.splits["train"].entries) == 6
    # a second run finds the dataset complete and reuses the same folder
    again = apply_synthesis(cfg, KalieDataModule(str(toy), generate=generate))
    assert again.root == dm.root


def test_bad_input_names_the_file_and_the_entry(toy_source, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(toy_source, broken)
    index = json.loads((broken / "data_jsonformat.json").read_text())
    mask = broken / index["entry_2"]["other"]["masks"][index["entry_2"]["other"]["objects"][0]]
    mask.unlink()
    with pytest.raises(KalieFormatError) as excinfo:
        synthesize_dataset(broken, tmp_path / "out", _recipe(), progress=False)
    assert "entry_2" in str(excinfo.value) and str(mask) in str(excinfo.value)

    class Broken(CompositingBackend):
        def inpaint(self, request):
            return request.image[:10]

    with pytest.raises(SynthesisError, match=r"data_jsonformat.json, entry 'entry_0', variant 0 \(seed"):
        synthesize_dataset(toy_source, tmp_path / "out2", KalieRecipe(Broken(), DatasetMasks()), progress=False)
    # an output folder holding another run is refused rather than mixed
    with pytest.raises(SynthesisOutputError, match="other parameters"):
        synthesize_dataset(toy_source, tmp_path / "out2", _recipe(), progress=False)


class _SeedFilter:
    """A stand-in for the VLM filter: refuses the n-th image it is shown when `refuse(n)` (n counts from 1)."""

    def __init__(self, refuse):
        self.refuse, self.calls = refuse, []

    def keep(self, image, task, objects):
        self.calls.append((task, tuple(objects)))
        return not self.refuse(len(self.calls))

    def describe(self):
        return {"filter": "test"}


def test_image_filter_redraws_refused_variants_and_leaves_out_the_hopeless(toy_source, tmp_path):
    from affordvla.data.kalie import read_kalie_index

    # every first look at a variant is refused, the redraw kept: all N + N*K entries, each variant redrawn once
    redraw = _SeedFilter(lambda call: call % 2 == 1)
    result = synthesize_dataset(toy_source, tmp_path / "redrawn", _recipe(image_filter=redraw, filter_attempts=2),
                                progress=False)
    manifest = json.loads((tmp_path / "redrawn" / "manifest.json").read_text())
    assert result.entries == N + N * K and len(redraw.calls) == 2 * N * K
    assert manifest["counts"]["filter_redraws"] == N * K and manifest["counts"]["filter_rejected"] == 0
    assert all(task for task, _ in redraw.calls)  # the entry's task and objects reach the filter

    # a filter that refuses everything after the first 2 looks: later variants are left out, counted, not redone
    strict = _SeedFilter(lambda call: call > 2)
    out = tmp_path / "strict"
    synthesize_dataset(toy_source, out, _recipe(image_filter=strict, filter_attempts=2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    entries, skipped = read_kalie_index(out)
    assert skipped == 0 and len(entries) == N + 2  # the originals and the 2 kept variants
    assert manifest["counts"]["filter_rejected"] == N * K - 2 and len(manifest["rejected"]) == N * K - 2
    assert manifest["counts"]["entries"] == N + 2
    calls = len(strict.calls)
    synthesize_dataset(toy_source, out, _recipe(image_filter=strict, filter_attempts=2), progress=False)
    assert len(strict.calls) == calls  # complete: the refused variants are not tried again
