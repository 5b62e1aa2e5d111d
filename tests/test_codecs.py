"""Keypoint text codecs: exact encodings, round trips, tolerated and rejected malformed outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from affordvla.formats.codecs import (
    CODECS,
    KalieJsonCodec,
    KeypointCodec,
    KeypointParseError,
    PaliGemmaLocCodec,
    RoboPointTupleCodec,
    make_codec,
)

# Five points exercising the clamps: inside, corners, beyond the image on both sides.
KP5 = np.array([[0.25, 0.5], [0.0, 0.0], [1.0, 1.0], [0.1, 0.9], [-0.2, 1.5]])


def _check_outcome(codec: KeypointCodec, text: str, expected) -> None:
    out = codec.try_decode(text)
    if expected is None:
        assert out is None
        assert (codec.n_parsed, codec.n_failed) == (0, 1)
        with pytest.raises(KeypointParseError):
            codec.decode(text)
    else:
        assert out is not None
        np.testing.assert_allclose(out, np.asarray(expected, dtype=float), rtol=0, atol=1e-12)
        assert (codec.n_parsed, codec.n_failed) == (1, 0)


# ---------------------------------------------------------------------------------------------- PaliGemma


def test_paligemma_encode_exact():
    assert PaliGemmaLocCodec(point_names=("p",)).encode(np.array([[0.25, 0.5]])) == "<loc0512><loc0256>"
    # y first; 0.9*1024 = 921.6 -> 921, 0.1*1024 = 102.4 -> 102; 1.0 and 1.5 clamp to 1023, -0.2 to 0.
    assert PaliGemmaLocCodec().encode(KP5) == (
        "<loc0512><loc0256><loc0000><loc0000><loc1023><loc1023><loc0921><loc0102><loc1023><loc0000>"
    )
    assert PaliGemmaLocCodec(point_names=("p",), bins=100).encode(np.array([[0.25, 0.5]])) == "<loc0050><loc0025>"


def test_paligemma_round_trip():
    codec = PaliGemmaLocCodec()
    text = codec.encode(KP5)
    dec = codec.decode(text)
    assert dec.shape == (5, 2)
    np.testing.assert_array_equal(dec[0], [256.5 / 1024, 512.5 / 1024])  # bin centres, (x, y) order
    inside = np.array([[0.25, 0.5], [0.0, 0.0], [0.999, 0.999], [0.1, 0.9], [0.7, 0.3]])
    assert np.abs(codec.decode(codec.encode(inside)) - inside).max() <= 1 / 1024  # within one bin
    centres = (np.array([[3, 900], [512, 0], [1023, 7], [100, 100], [64, 640]]) + 0.5) / 1024
    assert np.abs(codec.decode(codec.encode(centres)) - centres).max() <= 0.5 / 1024
    assert codec.encode(codec.decode(text)) == text
    assert codec.encode(codec.decode(codec.encode(inside))) == codec.encode(inside)


def test_paligemma_encode_wrong_count():
    with pytest.raises(ValueError):
        PaliGemmaLocCodec().encode(np.zeros((3, 2)))
    with pytest.raises(ValueError):
        PaliGemmaLocCodec(bins=20_000)


_PG = np.array([[256.5, 512.5], [900.5, 100.5]]) / 1024  # from <loc0512><loc0256><loc0100><loc0900>


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<loc0512><loc0256><loc0100><loc0900>", _PG),
        ("  <loc0512><loc0256><loc0100><loc0900>  ", _PG),
        ("Answer: <loc0512><loc0256><loc0100><loc0900>", _PG),
        ("<loc0512> <loc0256>\n<loc0100> <loc0900>", _PG),
        ("<loc0512><loc0256> grasp <loc0100><loc0900> target", _PG),
        ("<loc0512><loc0256> ; <loc0100><loc0900>", _PG),
        ("<loc0512><loc0256><seg012><loc0100><loc0900>", _PG),  # stray non-loc token
        ("<loc0512><loc0256><loc0100><loc0900><loc0001><loc0002>", _PG),  # extras dropped
        ("<loc0512><loc0256><loc0100><loc0900><loc1024>", _PG),  # bad token past the first 2K is unused
        ("<loc0512><loc0256><loc0100><loc0900><loc01", _PG),  # truncated after the answer
        ("<pad><bos><loc0512><loc0256>\n\n<loc0100><loc0900><eos>\n", _PG),
        ("'<loc0512><loc0256><loc0100><loc0900>'", _PG),  # quoted
        ("<loc0512>, <loc0256>, <loc0100>, <loc0900>,", _PG),  # separators, trailing comma
        ("[<loc0512><loc0256>] [<loc0100><loc0900>]", _PG),
        ("<loc0512><loc0256><loc0100><loc0900>" * 2, _PG),  # answer repeated
        ("<loc0000><loc1023><loc1023><loc0000>", [[1023.5 / 1024, 0.5 / 1024], [0.5 / 1024, 1023.5 / 1024]]),
        ("", None),
        ("   \n", None),
        ("<loc0512><loc0256><loc0100>", None),  # 3 of 4 tokens
        ("<loc0512><loc0256><loc0100><loc09", None),  # truncated inside the last token
        ("<loc0512><loc0256>", None),  # one point of two
        ("<loc1024><loc0256><loc0100><loc0900>", None),  # out of range
        ("<loc9999><loc0256><loc0100><loc0900>", None),
        ("<loc512><loc0256><loc0100><loc0900>", None),  # not 4 digits
        ("<loc00512><loc0256><loc0100><loc0900>", None),
        ("loc0512 loc0256 loc0100 loc0900", None),  # no angle brackets
        ("<loc-512><loc0256><loc0100><loc0900>", None),
        ("<LOC0512><LOC0256><LOC0100><LOC0900>", None),  # tokens are case-sensitive
        ("<loc 0512><loc 0256><loc 0100><loc 0900>", None),
        ("< loc0512 >< loc0256 >< loc0100 >< loc0900 >", None),
        ("<locNaN><loc0256><loc0100><loc0900>", None),
        ("<loc+512><loc0256><loc0100><loc0900>", None),
        ("<loc0512><loc0256><loc0100><loc0900", None),  # last token cut before its ">"
        ("<loc0512><loc0256><loc1024><loc0900>", None),  # out of range inside the answer
        ("[(0.25, 0.5), (0.9, 0.1)]", None),  # another codec's format
        ("I cannot see the object.", None),
    ],
)
def test_paligemma_malformed(text, expected):
    _check_outcome(PaliGemmaLocCodec(point_names=("a", "b")), text, expected)


def test_paligemma_custom_bins_range():
    codec = PaliGemmaLocCodec(point_names=("p",), bins=100)
    np.testing.assert_allclose(codec.decode("<loc0050><loc0025>"), [[0.255, 0.505]])
    assert codec.try_decode("<loc0100><loc0025>") is None  # index 100 is outside 0..99


# ---------------------------------------------------------------------------------------------- KALIE JSON

KALIE_KP = np.array([[0.397, 0.093], [0.5, 0.25], [1.2, -0.1], [0.0, 0.999], [0.0004, 0.9996]])
KALIE_TEXT = """{
    "Grasp Point": [
        "397",
        "093"
    ],
    "Function Point": [
        "500",
        "250"
    ],
    "Target Point": [
        "999",
        "000"
    ],
    "Pre-contact Point": [
        "000",
        "999"
    ],
    "Post-contact Point": [
        "000",
        "999"
    ]
}"""


def test_kalie_encode_exact():
    assert KalieJsonCodec().encode(KALIE_KP) == KALIE_TEXT
    assert KalieJsonCodec._fmt(0.397) == "397"
    assert KalieJsonCodec._fmt(0.093) == "093"
    assert KalieJsonCodec._fmt(1.2) == "999"
    assert KalieJsonCodec._fmt(-0.1) == "000"
    assert KalieJsonCodec._fmt(0.9996) == "999"  # rounds to 1000, clamped


def test_kalie_round_trip():
    codec = KalieJsonCodec()
    expected = np.array([[0.397, 0.093], [0.5, 0.25], [0.999, 0.0], [0.0, 0.999], [0.0, 0.999]])
    np.testing.assert_array_equal(codec.decode(KALIE_TEXT), expected)  # ints / 1000, exact
    ints = np.array([[1, 2], [10, 999], [500, 0], [123, 456], [7, 70]]) / 1000
    np.testing.assert_array_equal(codec.decode(codec.encode(ints)), ints)
    assert codec.encode(codec.decode(KALIE_TEXT)) == KALIE_TEXT


_KN = ("Grasp Point", "Pre-contact Point")
_KV = [[0.397, 0.093], [0.12, 0.845]]
_KJ = '{"Grasp Point": ["397", "093"], "Pre-contact Point": ["120", "845"]}'


@pytest.mark.parametrize(
    "text, expected",
    [
        (_KJ, _KV),
        (json.dumps(json.loads(_KJ), indent=4), _KV),
        ("Sure! Here are the keypoints:\n" + _KJ + "\nDone.", _KV),
        ("```json\n" + _KJ + "\n```", _KV),
        (_KJ[:-1], _KV),  # truncated: final "}" missing
        (_KJ[:-1] + ",\n  ", _KV),
        ('{"Grasp Point": ["397", "093",], "Pre-contact Point": ["120", "845"],}', _KV),  # trailing commas
        ("{'Grasp Point': ['397', '093'], 'Pre-contact Point': ['120', '845']}", _KV),  # single quotes
        ('{"Grasp Point": [397, 93], "Pre-contact Point": [120, 845]}', _KV),  # unquoted ints
        ('{  "Grasp Point" :[ "397" ,"093" ] ,\n\n "Pre-contact Point":["120","845"]  }', _KV),
        ('{"Grasp Point": ["397.9", "093.2"], "Pre-contact Point": ["120", "845"]}', _KV),  # int(float(v))
        ('{"Pre-contact Point": ["120", "845"], "Grasp Point": ["397", "093"]}', _KV),  # order by name
        ('{"Grasp Point": ["397", "093"], "Extra Point": ["1", "2"], "Pre-contact Point": ["120", "845"]}', _KV),
        ('{"grasp point": ["397", "093"], "PRE-CONTACT POINT": ["120", "845"]}', _KV),
        ("Grasp Point: (397, 93), Pre-contact Point: (120, 845)", _KV),  # KALIE string format
        ("The answer is Grasp Point: (397,93), Pre-contact Point: (120,  845).", _KV),
        ('{"Grasp Point": [0, 999], "Pre-contact Point": [1, 10]}', [[0.0, 0.999], [0.001, 0.01]]),
        ('{"Grasp Point": ["999", "000"], "Pre-contact Point": ["0", "999.9"]}', [[0.999, 0.0], [0.0, 0.999]]),
        ('"Grasp Point": ["397", "093"], "Pre-contact Point": ["120", "845"]', _KV),  # no braces
        ('{"Grasp Point": ["397", "093"] "Pre-contact Point": ["120", "845"]}', _KV),  # missing comma
        ('{"Grasp Point": ("397", "093"), "Pre-contact Point": ("120", "845")}', _KV),  # tuples
        ("Use the format {x, y}. Answer: " + _KJ, _KV),  # the first "{" is not the answer
        ("{'grasp point': ['397', '093'], 'pre-contact point': ['120', '845'],}", _KV),
        ("GRASP POINT: (397, 93), PRE-CONTACT POINT: (120, 845)", _KV),
        ("Grasp Point : [ 397 , 93 ] Pre-contact Point : [ '120' , '845' , ]", _KV),
        ("The Grasp Point is on the handle.\n" + _KJ, _KV),
        (_KJ + '\n{"Grasp Point": ["1", "2"], "Pre-contact Point": ["3", "4"]}', _KV),  # first object wins
        ("", None),
        ("no keypoints here", None),
        ("{", None),
        ('{"Grasp Point": ["397", "093"]}', None),  # missing point
        ('{"Grasp Point": ["397", "093"], "Pre-contact Point": ["120", "84', None),  # truncated in last point
        ('{"Grasp Point": ["397", "093"], "Pre-contact Point": [', None),
        ('{"Grasp Point": ["397"], "Pre-contact Point": ["120", "845"]}', None),  # one coordinate
        ('{"Grasp Point": ["397", "093", "5"], "Pre-contact Point": ["120", "845"]}', None),
        ('{"Grasp Point": ["abc", "093"], "Pre-contact Point": ["120", "845"]}', None),  # not a number
        ('{"Grasp Point": null, "Pre-contact Point": ["120", "845"]}', None),
        ('{"Grasp Point": "397, 093", "Pre-contact Point": ["120", "845"]}', None),
        ('[["397", "093"], ["120", "845"]]', None),  # list, no names
        ("Grasp Point: (397, 93)", None),  # string format, point missing
        ("Grasp Point: (0.397, 0.093), Pre-contact Point: (0.120, 0.845)", None),  # not 0-1000 ints
        ('{"Grasp Point": ["1000", "093"], "Pre-contact Point": ["120", "845"]}', None),  # out of 0..999
        ('{"Grasp Point": ["397", "-5"], "Pre-contact Point": ["120", "845"]}', None),
        ("Grasp Point: (397, 93), Pre-contact Point: (1200, 845)", None),
        ('{"Grasp Point": ["NaN", "093"], "Pre-contact Point": ["120", "845"]}', None),
        ('{"Grasp Point": [NaN, 93], "Pre-contact Point": [120, 845]}', None),
        ('{"Grasp Point": [Infinity, 93], "Pre-contact Point": [120, 845]}', None),
        ('{"Grasp Point": [true, 93], "Pre-contact Point": [120, 845]}', None),
        ('{"Grasp": ["397", "093"], "Pre-contact": ["120", "845"]}', None),  # names without "Point"
        ('{\n    "Grasp Point": [\n        "397",\n        "093"\n    ],\n'
         '    "Pre-contact Point": [\n        "1', None),
    ],
)
def test_kalie_malformed(text, expected):
    _check_outcome(KalieJsonCodec(point_names=_KN), text, expected)


# ---------------------------------------------------------------------------------------------- RoboPoint


def test_robopoint_encode_exact():
    codec = RoboPointTupleCodec()
    assert codec.encode(np.array([[0.512, 0.334], [0.1, 0.9]])) == "[(0.512, 0.334), (0.100, 0.900)]"
    assert codec.encode(np.array([[0.3334, 0.9996]])) == "[(0.333, 1.000)]"
    # Clipped to the image like the other codecs (the prompt asks for coordinates between 0 and 1).
    assert codec.encode(KP5) == "[(0.250, 0.500), (0.000, 0.000), (1.000, 1.000), (0.100, 0.900), (0.000, 1.000)]"
    assert codec.encode(np.array([[-0.0, -0.0001]])) == "[(0.000, 0.000)]"


def test_robopoint_round_trip():
    codec = RoboPointTupleCodec()
    kp = np.array([[0.51234, 0.3336], [0.1, 0.9], [0.0, 1.0]])
    dec = codec.decode(codec.encode(kp))
    np.testing.assert_allclose(dec, [[0.512, 0.334], [0.1, 0.9], [0.0, 1.0]], rtol=0, atol=1e-12)
    assert np.abs(dec - kp).max() <= 0.0005
    assert codec.encode(dec) == codec.encode(kp)


_RV = [[0.512, 0.334], [0.1, 0.9]]
_RT = "[(0.512, 0.334), (0.100, 0.900)]"


@pytest.mark.parametrize(
    "num_points, text, expected",
    [
        (None, _RT, _RV),
        (None, "(0.512, 0.334), (0.100, 0.900)", _RV),  # no outer brackets
        (None, "[(0.512,0.334),(0.100,0.900)]", _RV),
        (None, "[( 0.512 ,  0.334 ) , ( 0.100 , 0.900 )]", _RV),
        (None, "The points are " + _RT + ".", _RV),
        (None, "[(0.512, 0.334),\n (0.100, 0.900)]\n", _RV),
        (None, "[(0.512, 0.334), (0.100, 0.900), (0.3", _RV),  # truncated last tuple dropped
        (None, "[(0.512, 0.334), (0.100, 0.900), (0.3, 0.", _RV),
        (None, "[(0.512, 0.334), (0.100, 0.900)", _RV),  # closing bracket missing
        (None, "[(1, 0), (0.1, 0.9)]", [[1.0, 0.0], [0.1, 0.9]]),  # integer-looking values
        (None, "[(0.5, .25)]", [[0.5, 0.25]]),
        (None, "[(+0.512, 0.334)]", [[0.512, 0.334]]),
        (None, "[(0.512, 0.334), (0.1, 0.2, 0.3), (0.100, 0.900)]", _RV),  # 3-tuple is not a point
        (2, "[(0.512, 0.334), (0.100, 0.900), (0.700, 0.700)]", _RV),  # extras truncated
        (2, "[(0.512, 0.334), (0.100, 0.900), (0.7", _RV),
        (None, "[('0.512', '0.334'), ('0.100', '0.900')]", _RV),  # quoted numbers
        (None, '[("0.512", "0.334"), ("0.100", "0.900")]', _RV),
        (None, "[(0.512, 0.334,), (0.100, 0.900,),]", _RV),  # trailing commas
        (None, "[(0.512, 0.334), (0.100, 0.900]", _RV),  # ")" missing before "]"
        (None, "(0.512, 0.334), (0.100, 0.900)]", _RV),  # "[" missing
        (None, "Points (normalised): [(0.512, 0.334), (0.100, 0.900)]", _RV),  # prose in parentheses
        (None, "Each (x, y) pair: [(0.512, 0.334), (0.100, 0.900)]", _RV),
        (None, "[(0.512, 0.334)] and [(0.100, 0.900)]", _RV),
        (None, _RT + "</s>", _RV),
        (None, "[(0.5120, 0.3340), (1e-1, 9e-1)]", _RV),
        (None, "[(1.000, 0.000), (0, 1)]", [[1.0, 0.0], [0.0, 1.0]]),
        (None, "", None),
        (None, "[]", None),
        (None, "no points", None),
        (None, "[(0.512, 0.334", None),  # the only tuple is truncated
        (None, "[0.512, 0.334]", None),  # no parentheses
        (None, "[(0.512 0.334)]", None),  # no comma
        (None, "[(a, b)]", None),
        (None, "(0.5; 0.3)", None),
        (None, "[(, )]", None),
        (None, "[(0.1, 0.2, 0.3)]", None),
        (None, "<loc0512><loc0256>", None),
        (None, "[(1.5, 0.334)]", None),  # out of [0, 1]
        (None, "[(0.512, 0.334), (-0.100, 0.900)]", None),  # one bad point fails the answer
        (None, "[(320, 240), (100, 50)]", None),  # pixels, not normalised
        (None, "[(nan, 0.334)]", None),
        (None, "[(0.512, NaN), (0.100, 0.900)]", None),
        (None, "[(inf, 0.5)]", None),
        (None, "[[0.512, 0.334], [0.100, 0.900]]", None),  # lists, not tuples
        (None, "[(0,512, 0,334)]", None),  # decimal commas
        (None, "[(0.512; 0.334)]", None),
        (None, "The object is not visible in the image.", None),
        (2, "[(0.512, 0.334)]", None),  # too few for num_points
        (2, "[(0.512, 0.334), (0.1", None),  # truncated, then too few
    ],
)
def test_robopoint_malformed(num_points, text, expected):
    _check_outcome(RoboPointTupleCodec(num_points=num_points), text, expected)


# ---------------------------------------------------------------------------------------------- counters


def test_failure_counting():
    codec = PaliGemmaLocCodec(point_names=("p",))
    assert codec.failure_rate == 0.0  # nothing seen yet
    good = codec.encode(np.array([[0.25, 0.5]]))
    for text in [good, "junk", good, "<loc0512>", good]:
        codec.try_decode(text)
    with pytest.raises(KeypointParseError):
        codec.decode("")
    assert codec.try_decode(None) is None  # type: ignore[arg-type]
    assert (codec.n_parsed, codec.n_failed) == (3, 4)
    assert codec.failure_rate == pytest.approx(4 / 7)
    codec.reset_counts()
    assert (codec.n_parsed, codec.n_failed, codec.failure_rate) == (0, 0, 0.0)


def test_parse_error_is_value_error():
    assert issubclass(KeypointParseError, ValueError)


# ---------------------------------------------------------------------------------------------- factory


def test_make_codec():
    assert set(CODECS) == {"paligemma_loc", "kalie_json", "robopoint"}
    for name, cls in CODECS.items():
        codec = make_codec(name)
        assert isinstance(codec, cls) and codec.name == name
    assert make_codec("robopoint", num_points=3).num_points == 3
    assert make_codec("paligemma_loc", bins=256).bins == 256
    with pytest.raises(ValueError) as err:
        make_codec("nope")
    for name in CODECS:
        assert name in str(err.value)


# ---------------------------------------------------------------------------------------------- property


def _grid_cases(seed: int, count: int = 300):
    """Random keypoint sets on each codec's grid: (codec, keypoints) with a random point count and grid."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        k = int(rng.integers(1, 9))
        names = tuple(f"P{i} Point" for i in range(k))
        bins = int(rng.choice([1, 2, 7, 100, 1024, 10_000]))
        yield PaliGemmaLocCodec(names, bins=bins), (rng.integers(0, bins, (k, 2)) + 0.5) / bins
        yield KalieJsonCodec(names), rng.integers(0, 1000, (k, 2)) / 1000
        yield RoboPointTupleCodec(), rng.integers(0, 1001, (int(rng.integers(1, 51)), 2)) / 1000


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_is_exact_on_each_grid(seed):
    counts = dict.fromkeys(CODECS, 0)
    for codec, kp in _grid_cases(seed):
        text = codec.encode(kp)
        np.testing.assert_array_equal(codec.decode(text), kp)  # exact, not approximately
        assert codec.encode(codec.decode(text)) == text
        assert codec.n_failed == 0
        counts[codec.name] += 1
    assert min(counts.values()) == 300


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_off_grid_lands_on_the_nearest_grid_point(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(300):
        kp = rng.uniform(-0.1, 1.1, (5, 2))
        inside = np.clip(kp, 0, 1)
        for codec, tolerance in ((PaliGemmaLocCodec(), 1 / 1024), (KalieJsonCodec(), 0.001 + 1e-12),
                                 (RoboPointTupleCodec(), 0.0005 + 1e-12)):
            text = codec.encode(kp)
            dec = codec.decode(text)
            assert np.abs(dec - inside).max() <= tolerance, (codec.name, kp, text)
            assert codec.encode(dec) == text  # decoding lands on the grid point encode chose
