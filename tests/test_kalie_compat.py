"""KALIE's offline scores: the compat scorer against KALIE's `calculate_errors` rules, with every expected number
worked out by hand from those rules (the arithmetic is in the comments); the corrected scorer; the
`affordvla-eval kalie` predictions-file command on fixtures laid out as KALIE writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_formats import KALIE_ANSWER_TEXT

from affordvla.evaluate import main
from affordvla.formats.codecs import KalieJsonCodec
from affordvla.metrics.kalie_compat import (
    KalieCompatScorer,
    calculate_errors,
    compat_errors,
    kalie_corrected_scores,
)

NAMES = ("Grasp Point", "Function Point", "Target Point", "Pre-contact Point", "Post-contact Point")

LABEL = KALIE_ANSWER_TEXT  # as KALIE's fine-tuning data writes it
LABEL_STR = ("Grasp Point: (397, 93), Function Point: (500, 250), Target Point: (640, 410), "
             "Pre-contact Point: (600, 400), Post-contact Point: (700, 420)")
LABEL_ARRAY = [397, 93, 500, 250, 640, 410, 600, 400, 700, 420]


def answer(**changes) -> str:
    """The label text with some points replaced, written the way KALIE writes answers."""
    points = {"Grasp Point": ["397", "093"], "Function Point": ["500", "250"], "Target Point": ["640", "410"],
              "Pre-contact Point": ["600", "400"], "Post-contact Point": ["700", "420"]}
    points.update({k.replace("_", " ").replace("Pre contact", "Pre-contact").replace("Post contact",
                   "Post-contact"): v for k, v in changes.items()})
    return json.dumps(points, indent=4)


def test_the_fixture_is_kalies_own_text():
    assert LABEL == json.dumps({n: v for n, v in zip(NAMES, [["397", "093"], ["500", "250"], ["640", "410"],
                                                             ["600", "400"], ["700", "420"]])}, indent=4)
    assert answer() == LABEL
    assert KalieJsonCodec().encode(np.array(LABEL_ARRAY, float).reshape(5, 2) / 1000) == LABEL


# ---------------------------------------------------------------------------------------------- scored cases
# (prediction, label, formatstyle, {key: mse}, average)
SCORED = [
    # 1. the label itself: every difference 0
    (LABEL, LABEL, "json", dict.fromkeys(NAMES, 0.0), 0.0),
    # 2. grasp off by (3, 4): (9 + 16) / 2 = 12.5; the average is over the five keys: 12.5 / 5 = 2.5
    (answer(Grasp_Point=["400", "097"]), LABEL, "json", {"Grasp Point": 12.5}, 2.5),
    # 3. int(float(v)) truncates: "397.9" -> 397, "093.99" -> 93: no error
    (answer(Grasp_Point=["397.9", "093.99"]), LABEL, "json", {"Grasp Point": 0.0}, 0.0),
    # 4. truncation toward zero keeps the sign: "-7.9" -> -7 (floor would give -8); dx = -7 - 397 = -404,
    #    404^2 = 163216, / 2 = 81608; average 81608 / 5 = 16321.6
    (answer(Grasp_Point=["-7.9", "093"]), LABEL, "json", {"Grasp Point": 81608.0}, 16321.6),
    # 5. JSON numbers instead of strings read the same: 397.5 -> 397, 93 -> 93
    (answer(Grasp_Point=[397.5, 93]), LABEL, "json", {"Grasp Point": 0.0}, 0.0),
    # 6. only the keys the prediction has are scored and averaged: 12.5 / 1 = 12.5
    ('{"Grasp Point": ["400", "097"]}', LABEL, "json", {"Grasp Point": 12.5}, 12.5),
    # 7. the prediction's key order is kept: target (10, 0) -> 50, grasp (0, 0) -> 0; (50 + 0) / 2 = 25
    ('{"Target Point": ["650", "410"], "Grasp Point": ["397", "093"]}', LABEL, "json",
     {"Target Point": 50.0, "Grasp Point": 0.0}, 25.0),
    # 8. duplicate keys: json.loads keeps the last value -> one key, 0 error
    ('{"Grasp Point": ["000", "000"], "Grasp Point": ["397", "093"]}', LABEL, "json", {"Grasp Point": 0.0}, 0.0),
    # 9. whitespace around the object is fine
    ("  \n" + LABEL + "\n ", LABEL, "json", dict.fromkeys(NAMES, 0.0), 0.0),
    # 10. a two-character string unpacks into two characters: "39" -> ("3", "9") -> (3, 9);
    #     dx = 3 - 397 = -394, dy = 9 - 93 = -84: (155236 + 7056) / 2 = 81146; one key
    ('{"Grasp Point": "39"}', LABEL, "json", {"Grasp Point": 81146.0}, 81146.0),
    # 11. booleans are numbers to float(): (1, 0) vs (397, 93): (396^2 + 93^2) / 2 = (156816 + 8649) / 2 = 82732.5
    ('{"Grasp Point": [true, false]}', LABEL, "json", {"Grasp Point": 82732.5}, 82732.5),
    # 12. whatever float() reads counts: "3.97e2" -> 397.0, "9_3" -> 93.0
    ('{"Grasp Point": ["3.97e2", "9_3"]}', LABEL, "json", {"Grasp Point": 0.0}, 0.0),
    # 13. str style: grasp (400, 97) -> 12.5, function exact -> 0; (12.5 + 0) / 2 = 6.25
    ("Grasp Point: (400, 97), Function Point: (500, 250)", LABEL_STR, "str",
     {"Grasp Point": 12.5, "Function Point": 0.0}, 6.25),
    # 14. str style drops what its regex does not match: a negative x, two spaces after the colon, a decimal;
    #     only the post-contact pair (700, 430) is left: 10^2 / 2 = 50
    ("Grasp Point: (-5, 97), Function Point:  (500, 250), Target Point: (640.5, 410), "
     "Post-contact Point: (700, 430)", LABEL_STR, "str", {"Post-contact Point": 50.0}, 50.0),
    # 15. array style: ten numbers in canonical order; grasp (400, 97) -> 12.5; always five keys: 2.5
    ([400, 97, 500, 250, 640, 410, 600, 400, 700, 420], LABEL_ARRAY, "array",
     {"Grasp Point": 12.5, "Target Point": 0.0}, 2.5),
    # 16. array style ignores items past the tenth
    ([*LABEL_ARRAY, 999, 999], LABEL_ARRAY, "array", dict.fromkeys(NAMES, 0.0), 0.0),
    # 17. array style indexes whatever it gets, a string too: "9123456789" vs "0123456789" -> grasp (9, 1) vs
    #     (0, 1): 81 / 2 = 40.5, the rest equal; 40.5 / 5 = 8.1
    ("9123456789", "0123456789", "array", {"Grasp Point": 40.5, "Function Point": 0.0}, 8.1),
]


@pytest.mark.parametrize("pred, label, style, expected_mse, expected_avg", SCORED)
def test_scored_by_hand(pred, label, style, expected_mse, expected_avg):
    result = calculate_errors(pred, label, style)
    for key, mse in expected_mse.items():
        assert result.mse[key] == mse
    assert result.average_mse == pytest.approx(expected_avg, rel=1e-12)


def test_per_point_abs_errors_and_key_order():
    result = calculate_errors(answer(Grasp_Point=["400", "097"], Target_Point=["630", "430"]), LABEL, "json")
    assert (result.abs_x["Grasp Point"], result.abs_y["Grasp Point"]) == (3, 4)
    assert (result.abs_x["Target Point"], result.abs_y["Target Point"]) == (10, 20)  # |630-640|, |430-410|
    assert result.mse["Target Point"] == 250.0  # (100 + 400) / 2
    assert result.average_mse == pytest.approx(52.5)  # (12.5 + 250) / 5
    swapped = calculate_errors('{"Target Point": ["640", "410"], "Grasp Point": ["397", "093"]}', LABEL, "json")
    assert list(swapped.mse) == ["Target Point", "Grasp Point"]


# ---------------------------------------------------------------------------------------------- the sentinel
SENTINEL = [
    ("{}", LABEL, "json"),  # 18. an empty object
    ("The grasp point is at (397, 93).", LABEL, "json"),  # 19. prose: json.loads fails -> {}
    ('Answer: {"Grasp Point": ["397", "093"]}', LABEL, "json"),  # 20. no search for an object inside prose
    (LABEL + "\nDone.", LABEL, "json"),  # 21. no tolerance of text after the object
    ("[]", LABEL, "json"),  # 22. an empty list has no points either
    ('""', LABEL, "json"),  # 23. nor does an empty JSON string
    ("", LABEL, "json"),  # 24. nor an empty answer
    (None, LABEL, "json"),  # 25. json.loads(None) raises TypeError, caught like any failure -> {}
    ("{}", "this label is not JSON", "json"),  # 26. the label is not looked up for the sentinel
    ("Grasp Point: (-1, -1)", LABEL_STR, "str"),  # 27. str style with nothing its regex matches
]


@pytest.mark.parametrize("pred, label, style", SENTINEL)
def test_no_points_scores_the_sentinel(pred, label, style):
    result = calculate_errors(pred, label, style)
    assert result.average_mse == 1_000_000
    assert result.mse == dict.fromkeys(NAMES, 1_000_000)
    assert result.abs_x == result.abs_y == dict.fromkeys(NAMES, 500)


# ---------------------------------------------------------------------------------------------- raising cases
RAISING = [
    (answer() [:-2] + ',\n    "Handle Point": [\n        "1",\n        "2"\n    ]\n}', LABEL, "json",
     "KeyError"),  # 28. an extra key the label lacks
    ('{"Pre-Contact Point": ["600", "400"]}', LABEL, "json", "KeyError"),  # 29. other capitalisation
    ('{"Grasp Point": ["397", "093"]}', "not JSON", "json", "KeyError"),  # 30. a label that does not load
    ('{"Grasp Point": ["397", "093"]}', '[["397", "093"]]', "json", "TypeError"),  # 31. a label that is a list
    ('[["397", "093"]]', LABEL, "json", "TypeError"),  # 32. a list answer: list indices must be ints
    ("[5]", LABEL, "json", "IndexError"),  # 33. ... and an int in it indexes past the end
    ("5", LABEL, "json", "TypeError"),  # 34. a number: len() of an int
    ("null", LABEL, "json", "TypeError"),  # 35. null: len(None)
    ('"ab"', LABEL, "json", "TypeError"),  # 36. a JSON string is indexed by its characters
    ('{"Grasp Point": ["397"]}', LABEL, "json", "ValueError"),  # 37. one number: not enough to unpack
    ('{"Grasp Point": ["1", "2", "3"]}', LABEL, "json", "ValueError"),  # 38. three: too many
    ('{"Grasp Point": 397}', LABEL, "json", "TypeError"),  # 39. not a pair at all
    ('{"Grasp Point": "397"}', LABEL, "json", "ValueError"),  # 40. a 3-character string: too many to unpack
    ('{"Grasp Point": ["abc", "093"]}', LABEL, "json", "ValueError"),  # 41. float("abc")
    ('{"Grasp Point": [null, "093"]}', LABEL, "json", "TypeError"),  # 42. float(None)
    ('{"Grasp Point": [NaN, 93]}', LABEL, "json", "ValueError"),  # 43. int(nan)
    ('{"Grasp Point": [Infinity, 93]}', LABEL, "json", "OverflowError"),  # 44. int(inf)
    ('{"Grasp Point": ["1e400", "093"]}', LABEL, "json", "OverflowError"),  # 45. float("1e400") is inf
    ('{"Grasp Point": {"x": 1, "y": 2}}', LABEL, "json", "ValueError"),  # 46. an object unpacks to its keys
    # 46b. int(float("1e200")) is an exact 201-digit int; its square over 2 does not fit a float
    ('{"Grasp Point": ["1e200", "093"]}', LABEL, "json", "OverflowError"),
    ("Pre contact Point: (600, 400)", LABEL_STR, "str", "KeyError"),  # 47. the regex keeps one word: "contact Point"
    ("", None, "str", "TypeError"),  # 48. str style parses the label before the sentinel check
    (LABEL_ARRAY[:9], LABEL_ARRAY, "array", "IndexError"),  # 49. nine numbers
    ([None, *LABEL_ARRAY[1:]], LABEL_ARRAY, "array", "TypeError"),  # 50. a null coordinate
    ({"a": 1}, LABEL_ARRAY, "array", "KeyError"),  # 51. an object indexed by 0
    (LABEL_ARRAY, LABEL, "array", "ValueError"),  # 52. a JSON label text read as characters: float("{")
]


@pytest.mark.parametrize("pred, label, style, kind", RAISING)
def test_raising_cases_are_counted_failures(pred, label, style, kind):
    with pytest.raises(Exception) as raised:  # what KALIE's function does
        calculate_errors(pred, label, style)
    assert type(raised.value).__name__ == kind
    assert compat_errors(pred, label, style) == kind  # what the compat scorer reports instead of crashing
    scorer = KalieCompatScorer(style)
    scorer.add(pred, label, "entry_7")
    metrics = scorer.compute()
    assert metrics["kalie_compat/scoring_failures"] == 1.0 and metrics[f"kalie_compat/scoring_failures_{kind}"] == 1
    assert metrics["kalie_compat/scored"] == 0.0 and "kalie_compat/avg_mse" not in metrics
    assert scorer.failed == [("entry_7", kind)]


def test_the_evaluation_loop_by_hand():
    scorer = KalieCompatScorer("json")
    scorer.add(LABEL, LABEL)  # A: exact, 0
    scorer.add(answer(Grasp_Point=["400", "097"]), LABEL)  # B: grasp 12.5 (abs 3, 4), average 2.5
    scorer.add("{}", LABEL)  # C: the sentinel, 1e6 everywhere
    scorer.add('{"Grasp Point": ["397", "093"], "Handle Point": ["1", "2"]}', LABEL)  # D: KeyError
    scorer.add("null", LABEL)  # E: TypeError
    scorer.add('{"Target Point": ["650", "410"]}', LABEL)  # F: target only, 10^2 / 2 = 50, average 50
    m = scorer.compute()
    assert m["kalie_compat/answers"] == 6 and m["kalie_compat/scored"] == 4
    assert m["kalie_compat/scoring_failures"] == 2
    assert m["kalie_compat/scoring_failures_KeyError"] == 1 and m["kalie_compat/scoring_failures_TypeError"] == 1
    assert m["kalie_compat/scoring_failures_ValueError"] == 0
    assert m["kalie_compat/avg_mse"] == pytest.approx(250013.125)  # (0 + 2.5 + 1e6 + 50) / 4
    assert m["kalie_compat/grasp_mse"] == pytest.approx(333337.5)  # (0 + 12.5 + 1e6) / 3: F has no grasp point
    assert m["kalie_compat/targ_mse"] == pytest.approx(250012.5)  # (0 + 0 + 1e6 + 50) / 4
    assert m["kalie_compat/func_mse"] == pytest.approx(1e6 / 3)  # (0 + 0 + 1e6) / 3
    assert m["kalie_compat/grasp_abs_x"] == pytest.approx(503 / 3)  # (0 + 3 + 500) / 3
    assert m["kalie_compat/grasp_abs_y"] == pytest.approx(168.0)  # (0 + 4 + 500) / 3
    assert m["kalie_compat/acc"] == pytest.approx(1 / 6)  # only A equals its label as a string
    assert m["kalie_compat/acc_ignoring_case"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="formatstyle must be one of"):
        KalieCompatScorer("yaml")


# ---------------------------------------------------------------------------------------------- corrected


def test_corrected_scores_hand_computed():
    target = np.array([[0.1, 0.2], [0.5, 0.5], [0.3, 0.4], [0.0, 0.0], [0.999, 1.0]])
    pred = np.array([[0.103, 0.196], [0.5, 0.5], [0.31, 0.38], [-0.05, 0.002], [1.2, 0.9994]])
    s = kalie_corrected_scores(pred, target)
    # 0-999 ints: target (100,200) (500,500) (300,400) (0,0) (999,999); pred (103,196) (500,500) (310,380)
    # (0,2) (999,999) after clamping -50 -> 0, 1200 -> 999, 1000 -> 999 and rounding 999.4 -> 999.
    assert s["grasp_mse"] == 12.5  # (3^2 + 4^2) / 2
    assert (s["grasp_abs_x"], s["grasp_abs_y"]) == (3.0, 4.0)
    assert s["func_mse"] == 0.0
    assert s["targ_mse"] == 250.0  # (10^2 + 20^2) / 2
    assert s["prec_mse"] == 2.0 and (s["prec_abs_x"], s["prec_abs_y"]) == (0.0, 2.0)
    assert s["postc_mse"] == 0.0
    assert s["avg_mse"] == pytest.approx(264.5 / 5)
    assert s["exact_match"] == 0.0
    assert len(s) == 5 * 3 + 2


def test_corrected_scores_round_to_the_grid():
    target = np.zeros((5, 2))
    # 0.3976 * 1000 = 397.6 rounds to 398 (truncation would give 397): (398^2 + 0) / 2 = 79202
    assert kalie_corrected_scores(np.array([[0.3976, 0.0]] + [[0.0, 0.0]] * 4), target)["grasp_mse"] == 79202.0
    # a float32 target of 0.29 is 0.28999999165...: rounding keeps it on cell 290, the same cell as 0.29
    stored = np.array([[0.29, 0.29]] * 5, dtype=np.float32)
    assert kalie_corrected_scores(np.array([[0.29, 0.29]] * 5), stored)["exact_match"] == 1.0


def test_corrected_sentinel_and_other_names():
    target = np.array([[0.1, 0.2], [0.5, 0.5], [0.3, 0.4], [0.0, 0.0], [0.999, 1.0]])
    assert kalie_corrected_scores(target + 0.0001, target)["avg_mse"] == 0.0  # below the grid's resolution
    for bad in (None, np.full((5, 2), np.nan)):
        s = kalie_corrected_scores(bad, target)
        assert s["avg_mse"] == 1_000_000.0 and s["exact_match"] == 0.0
        assert all(s[f"{p}_mse"] == 1e6 and s[f"{p}_abs_x"] == s[f"{p}_abs_y"] == 500.0
                   for p in ("grasp", "func", "targ", "prec", "postc"))
    s = kalie_corrected_scores(np.array([[0.0, 0.0], [0.5, 0.5]]), np.array([[0.0, 0.01], [0.5, 0.5]]), ("a", "b"))
    assert s["p0_mse"] == 50.0 and s["p1_mse"] == 0.0 and s["avg_mse"] == 25.0  # (10^2) / 2, then / 2 points
    with pytest.raises(ValueError):
        kalie_corrected_scores(np.zeros((2, 2)), np.zeros((5, 2)))


# ---------------------------------------------------------------------------------------------- affordvla-eval kalie

# Entry points on the stored image's 0-1000 scale, as hdf5_to_json writes them, and KALIE's evaluation label of
# the same entry on a 700x700 image, worked by hand: pixel = round(v * 700 / 1000), minus the crop offset 125,
# then round(p * 1000 / 450), clamped to 0..999:
#   Grasp (397, 93): x 277.9 -> 278 -> 153 -> 340.0 = 340; y 65.1 -> 65 -> -60 -> -133.3 -> "000"
#   Function (500, 250): x 350 -> 225 -> 500.0; y 175 -> 50 -> 111.1 -> 111
#   Target (640, 410): x 448 -> 323 -> 717.8 -> 718; y 287 -> 162 -> 360.0 -> 360
#   Pre-contact (600, 400): x 420 -> 295 -> 655.6 -> 656; y 280 -> 155 -> 344.4 -> 344
#   Post-contact (700, 420): x 490 -> 365 -> 811.1 -> 811; y 294 -> 169 -> 375.6 -> 376
# Entry 1 moves Grasp to (100, 1000): x 70 -> -55 -> "000"; y 700 -> 575 -> 1277.8 -> "999".
CROP_LABEL_0 = """{
    "Grasp Point": [
        "340",
        "000"
    ],
    "Function Point": [
        "500",
        "111"
    ],
    "Target Point": [
        "718",
        "360"
    ],
    "Pre-contact Point": [
        "656",
        "344"
    ],
    "Post-contact Point": [
        "811",
        "376"
    ]
}"""
CROP_LABEL_1 = CROP_LABEL_0.replace('"340",\n        "000"', '"000",\n        "999"')


def crop_answer(**changes) -> str:
    """CROP_LABEL_0 with some points replaced, written the way KALIE writes answers."""
    points = json.loads(CROP_LABEL_0)
    points.update({k.replace("_", " "): v for k, v in changes.items()})
    return json.dumps(points, indent=4)


def _kalie_root(tmp_path, size=(700, 700)):
    """A KALIE dataset root as hdf5_to_json writes it: data_jsonformat.json holds each entry's points as a JSON
    string of json.dumps(..., indent=4) ints on the 0-1000 scale; imgs/ holds the images (read for their size)."""
    from PIL import Image

    points_0 = ('{\n    "Grasp Point": [\n        397,\n        93\n    ],\n    "Function Point": [\n        500,\n'
                '        250\n    ],\n    "Target Point": [\n        640,\n        410\n    ],\n    "Pre-contact Point"'
                ': [\n        600,\n        400\n    ],\n    "Post-contact Point": [\n        700,\n        420\n'
                '    ]\n}')
    points_1 = points_0.replace("397", "100").replace("        93\n", "        1000\n")
    other = {"task": "Sweep the trash off the table with the brush.", "objects": ["brush", "trash"]}
    data = {f"entry_{i}": {"img": f"data/imgs/entry_{i}.png", "points": p, "other": other}
            for i, p in enumerate((points_0, points_1, points_0, points_0))}
    root = tmp_path / "kalie"
    (root / "imgs").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", size).save(root / "imgs" / f"entry_{i}.png")
    (root / "data_jsonformat.json").write_text(json.dumps(data, indent=4))
    return root


def test_crop_label_points_by_hand():
    from affordvla.metrics.kalie_compat import crop_label_points

    # 700x700 (crop box 125..575): see the comment above CROP_LABEL_0; 5 -> 3.5 rounds half to even -> 4 -> -121
    # -> "000"; 1000 -> 700 -> 575 -> 1277.8 -> 999
    assert crop_label_points({"Grasp Point": (397, 93), "Function Point": (5, 1000)}, 700, 700) == {
        "Grasp Point": (340, 0), "Function Point": (0, 999)}
    # 500 is the centre of any image: 350 - 125 = 225 -> 500; on 1400x1400 the crop is 900 wide from 250:
    # 700 - 250 = 450 -> 500; 250 -> 350 - 250 = 100 -> 111.1 -> 111
    assert crop_label_points({"Grasp Point": (500, 500)}, 700, 700) == {"Grasp Point": (500, 500)}
    assert crop_label_points({"Grasp Point": (500, 250)}, 1400, 1400) == {"Grasp Point": (500, 111)}


def test_root_labels_are_kalies_crop_scale_texts(tmp_path):
    from affordvla.metrics.kalie_compat import read_labels

    root = _kalie_root(tmp_path)
    labels = read_labels(root)
    assert labels["entry_0"] == CROP_LABEL_0 and labels["entry_1"] == CROP_LABEL_1
    assert read_labels(root, "str")["entry_0"] == (
        "Grasp Point: (340, 000), Function Point: (500, 111), Target Point: (718, 360), "
        "Pre-contact Point: (656, 344), Post-contact Point: (811, 376)")
    assert read_labels(root, "array")["entry_1"] == [0, 999, 500, 111, 718, 360, 656, 344, 811, 376]
    (root / "imgs" / "entry_3.png").unlink()
    with pytest.raises(ValueError, match="entry_3.*image file not found"):
        read_labels(root)


def test_eval_kalie_side_by_side(tmp_path, capsys):
    root = _kalie_root(tmp_path)
    predictions = tmp_path / "preds.jsonl"
    rows = [{"id": "entry_0", "answer": "Sure! " + CROP_LABEL_0},  # compat: prose -> sentinel; corrected: exact
            # grasp ("003", "996") vs the crop label's ("000", "999"): (3^2 + 3^2) / 2 = 9, average 9 / 5 = 1.8
            {"id": "entry_1", "answer": crop_answer(Grasp_Point=["003", "996"])},
            {"id": "entry_2", "answer": '{"Grasp Point": ["340", "000"], "Handle Point": ["1", "2"]}'},  # KeyError
            {"id": "entry_3", "answer": CROP_LABEL_0}]  # KALIE's own label text: 0, and an exact match
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    assert main(["--out", str(out), "kalie", "--predictions", str(predictions), "--labels", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert report["answers"] == 4 and report["labels_unanswered"] == 0
    assert report["kalie_compat/scored"] == 3 and report["kalie_compat/scoring_failures_KeyError"] == 1
    assert report["kalie_compat/failed"] == [{"id": "entry_2", "kind": "KeyError"}]
    assert report["kalie_compat/avg_mse"] == pytest.approx((1_000_000 + 1.8 + 0) / 3)
    assert report["kalie_compat/grasp_mse"] == pytest.approx((1_000_000 + 9 + 0) / 3)
    assert report["kalie_compat/acc"] == pytest.approx(1 / 4)
    # corrected: entry_0 exact, entry_1 1.8, entry_2 lacks four points -> the sentinel, entry_3 exact
    assert report["kalie_corrected/avg_mse"] == pytest.approx((0 + 1.8 + 1_000_000 + 0) / 4)
    assert report["kalie_corrected/parse_failures"] == 1
    assert report["kalie_corrected/exact_match"] == pytest.approx(2 / 4)
    assert report["kalie_corrected/unreadable_labels"] == 0


def test_eval_kalie_labels_file_and_styles(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a": LABEL_STR, "b": LABEL_STR}))
    predictions = tmp_path / "preds.json"  # a JSON list this time
    predictions.write_text(json.dumps([{"id": "a", "answer": "Grasp Point: (400, 97)"},  # 12.5, one key
                                       {"id": "b", "answer": LABEL_STR}]))  # exact
    assert main(["kalie", "--predictions", str(predictions), "--labels", str(labels), "--formatstyle", "str"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kalie_compat/avg_mse"] == pytest.approx((12.5 + 0) / 2)
    assert report["kalie_compat/acc"] == 0.5
    assert report["kalie_corrected/avg_mse"] == pytest.approx((1_000_000 + 0) / 2)  # a needs all five points

    array_labels = tmp_path / "array.jsonl"
    array_labels.write_text(json.dumps({"id": 1, "label": LABEL_ARRAY}) + "\n")
    array_preds = tmp_path / "array_preds.jsonl"
    array_preds.write_text(json.dumps({"id": 1, "answer": [400, 97, *LABEL_ARRAY[2:]]}) + "\n")
    assert main(["kalie", "--predictions", str(array_preds), "--labels", str(array_labels),
                 "--formatstyle", "array"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kalie_compat/avg_mse"] == report["kalie_corrected/avg_mse"] == pytest.approx(2.5)  # 12.5 / 5




def test_eval_kalie_unreadable_labels_are_counted(tmp_path):
    from affordvla.evaluate import evaluate_kalie_predictions

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a": '{"Grasp Point": [1, 2]}', "b": LABEL, "c": "not json"}))
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"id": "a", "answer": '{"Grasp Point": ["4", "6"]}'}) + "\n"
                           + json.dumps({"id": "b", "answer": LABEL}) + "\n"
                           + json.dumps({"id": "c", "answer": LABEL}) + "\n")
    report = evaluate_kalie_predictions(predictions, labels)
    # compat as KALIE: a scores its one key, (3^2 + 4^2) / 2 = 12.5; b exact, 0; c's label loads as no points, so
    # the answer's first key is missing from it: KeyError
    assert report["kalie_compat/scored"] == 2 and report["kalie_compat/avg_mse"] == pytest.approx((12.5 + 0) / 2)
    assert report["kalie_compat/failed"] == [{"id": "c", "kind": "KeyError"}]
    # corrected: a and c lack five readable points: counted and listed, left out of the means (b alone: 0)
    assert report["kalie_corrected/unreadable_labels"] == 2
    assert report["kalie_corrected/unreadable_label_ids"] == ["a", "c"]
    assert report["kalie_corrected/avg_mse"] == 0.0 and report["kalie_corrected/exact_match"] == 1.0


def test_eval_kalie_input_errors_name_the_file(tmp_path):
    root = _kalie_root(tmp_path)
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"id": "entry_9", "answer": LABEL}) + "\n")
    from affordvla.evaluate import evaluate_kalie_predictions

    with pytest.raises(ValueError, match="prediction 'entry_9' has no label in"):
        evaluate_kalie_predictions(predictions, root)
    (root / "data_jsonformat.json").unlink()
    with pytest.raises(ValueError, match="data_jsonformat.json: file not found"):
        evaluate_kalie_predictions(predictions, root, "str")
    predictions.write_text('{"answer": "x"}\n')
    with pytest.raises(ValueError, match=r'preds.jsonl, record 1: expected an object with "id" and "answer"'):
        evaluate_kalie_predictions(predictions, root)
