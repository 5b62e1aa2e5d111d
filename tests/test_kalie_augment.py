"""KALIE's image pipeline: keypoints follow the pixels through every transform."""

import numpy as np
import pytest

from affordvla.data.kalie_augment import (
    KalieAugmentation,
    centre_crop,
    centre_crop_box,
    warp_sample,
)
from affordvla.formats.sample import KeypointSample

GEOMETRY_ONLY = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def _marker_image(width, height, point):
    """Black image with a 3x3 white square centred on the pixel holding `point` (normalised)."""
    image = np.zeros((height, width, 3), np.uint8)
    col, row = int(point[0] * width), int(point[1] * height)
    image[row - 1 : row + 2, col - 1 : col + 2] = 255
    # the marker's centre in continuous pixel units is the centre of pixel (col, row)
    return image, np.array([(col + 0.5) / width, (row + 0.5) / height], np.float32)


def _found(image):
    weights = image[..., 0].astype(np.float64)
    rows, cols = np.indices(weights.shape)
    total = weights.sum()
    return np.array([(cols * weights).sum() / total + 0.5, (rows * weights).sum() / total + 0.5])


def test_centre_crop_box_is_kalies_450_of_700():
    assert centre_crop_box(700, 700, 450 / 700) == (125, 125, 575, 575)
    assert centre_crop_box(140, 140, 450 / 700) == (25, 25, 115, 115)


def test_centre_crop_moves_keypoints_into_crop_units():
    image = np.zeros((700, 700, 3), np.uint8)
    sample = KeypointSample(image=image, instruction="x", keypoints=np.array([[0.5, 0.5], [125 / 700, 575 / 700],
                                                                              [0.0, 0.0], [1.0, 1.0], [0.5, 0.25]]))
    out = centre_crop(sample)
    assert out.image.shape == (450, 450, 3)
    np.testing.assert_allclose(out.keypoints[0], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(out.keypoints[1], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out.keypoints[2], [-125 / 450, -125 / 450], atol=1e-6)  # outside: not clipped
    np.testing.assert_allclose(out.keypoints[4], [0.5, (175 - 125) / 450], atol=1e-6)


def test_pure_translation_warp_is_exact():
    image, centre = _marker_image(64, 48, (0.3, 0.6))
    sample = KeypointSample(image=image, instruction="x", keypoints=np.tile(centre, (5, 1)))
    matrix = np.array([[1.0, 0, 7], [0, 1, -3], [0, 0, 1]])
    out = warp_sample(sample, matrix, (64, 48))
    np.testing.assert_allclose(out.keypoints[0] * [64, 48], centre * [64, 48] + [7, -3], atol=1e-5)
    assert out.image[int(centre[1] * 48) - 3, int(centre[0] * 64) + 7, 0] == 255


@pytest.mark.parametrize("size", [(140, 140), (160, 120)])
def test_markers_land_where_the_keypoints_say(size):
    """For at least 30 random draws of the whole pipeline, a marker drawn at a keypoint is found within 1 px of where
    the transformed keypoint says it is."""
    width, height = size
    augment = KalieAugmentation(**GEOMETRY_ONLY)
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(40):
        image, centre = _marker_image(width, height, rng.uniform(0.3, 0.7, 2))
        sample = KeypointSample(image=image, instruction="x", keypoints=np.tile(centre, (5, 1)))
        out = augment(sample, np.random.default_rng(trial))
        out_h, out_w = out.image.shape[:2]
        assert (out_w, out_h) == (round(width * 450 / 700), round(height * 450 / 700))
        expected = out.keypoints[0] * [out_w, out_h]
        if not (4 <= expected[0] <= out_w - 4 and 4 <= expected[1] <= out_h - 4):
            continue  # the marker is cut by the border: its centroid would be biased
        checked += 1
        assert np.linalg.norm(_found(out.image) - expected) <= 1.0, (trial, _found(out.image), expected)
    assert checked >= 30


def test_flips_alone_mirror_keypoints():
    augment = KalieAugmentation(rotation_degrees=0.0, crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0),
                                horizontal_flip=1.0, vertical_flip=1.0, crop_fraction=1.0, **GEOMETRY_ONLY)
    image, centre = _marker_image(50, 50, (0.2, 0.7))
    sample = KeypointSample(image=image, instruction="x", keypoints=np.tile(centre, (5, 1)))
    out = augment(sample, np.random.default_rng(0))
    np.testing.assert_allclose(out.keypoints[0], 1 - centre, atol=1e-6)
    np.testing.assert_array_equal(out.image, image[::-1, ::-1])


def test_same_rng_same_result_and_colour_jitter_changes_colours_only():
    rng_image = np.random.default_rng(1).integers(0, 256, (70, 70, 3), dtype=np.uint8)
    sample = KeypointSample(image=rng_image, instruction="x", keypoints=np.full((5, 2), 0.5))
    a = KalieAugmentation()(sample, np.random.default_rng(5))
    b = KalieAugmentation()(sample, np.random.default_rng(5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    plain = KalieAugmentation(**GEOMETRY_ONLY)(sample, np.random.default_rng(5))
    np.testing.assert_array_equal(plain.keypoints, a.keypoints)  # jitter draws after the geometry
    assert not np.array_equal(plain.image, a.image)


def test_datamodule_augments_train_draws_reproducibly_and_crops_eval(tmp_path):
    from affordvla.data.datamodule import KalieDataModule
    from affordvla.data.kalie import write_kalie_dataset

    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8),
              {name: (500, 300 + 100 * i) for i, name in enumerate(
                  ["Grasp Point", "Function Point", "Target Point", "Pre-contact Point", "Post-contact Point"])},
              {"task": "Close the drawer.", "objects": ["open drawer"]}) for _ in range(10)]
    write_kalie_dataset(tmp_path, items)
    dm = KalieDataModule(str(tmp_path), batch_size=2, augmentation=KalieAugmentation(), sampler_seed=3)
    dm.setup()
    dm.collate = list
    train, test = dm.splits["train"], dm.splits["test"]
    a, b, other_epoch = train[(0, 1)], train[(0, 1)], train[(0, 2)]
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, other_epoch.image)
    assert a.image.shape == (45, 45, 3) and a.meta["view"] == "augmented"
    cropped = test[0]
    assert cropped.image.shape == (45, 45, 3)
    # 70 px -> a 45 px crop from pixel 12; the grasp point (500, 300) is pixel (35, 21)
    np.testing.assert_allclose(cropped.keypoints[0], [(35 - 12) / 45, (21 - 12) / 45], atol=1e-6)
    # the mean baseline is expressed in the same cropped view
    f = 450 / 700
    np.testing.assert_allclose(dm.train_keypoint_mean()[0], (np.array([0.5, 0.3]) - (1 - f) / 2) / f, atol=1e-6)
    sampler_items = list(dm.train_dataloader().sampler)
    assert all(isinstance(item, tuple) and item[1] == 0 for item in sampler_items)
