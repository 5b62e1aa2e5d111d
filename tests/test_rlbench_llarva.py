"""RLBench episodes (both layouts, restricted unpickling, depth, keyframes) and LLARVA annotations."""

import json
import pickle

import numpy as np
import pytest

from affordvla.data.llarva import episode_records, project_points, write_llarva_annotations
from affordvla.data.rlbench import (
    RLBenchFormatError,
    decode_depth,
    encode_depth,
    keyframes,
    list_episodes,
    load_rlbench_pickle,
    write_episode,
)
from affordvla.data.safe_pickle import UnsafePickleError
from affordvla.formats.llarva import llarva_answer, llarva_prompt, parse_llarva_action

K = np.array([[100.0, 0, 64], [0, 100.0, 64], [0, 0, 1]])


def _observations(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{
        "joint_positions": rng.uniform(-1, 1, 7), "joint_velocities": rng.uniform(-1, 1, 7),
        "gripper_open": 1.0 if i < n // 2 else 0.0,
        "gripper_pose": np.array([0.05 * i, 0.0, 1.0, 0, 0, 0, 1]),
        "misc": {"front_camera_extrinsics": np.eye(4), "front_camera_intrinsics": K,
                 "front_camera_near": 0.1, "front_camera_far": 4.0},
        "front_rgb": None,
    } for i in range(n)]


def _images(n):
    return {"front_rgb": [np.full((8, 8, 3), i, np.uint8) for i in range(n)],
            "front_depth": [encode_depth(np.full((8, 8), 0.25)) for _ in range(n)]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlbench")
    # upstream layout for one task, the PerAct/LLARVA all_variations layout for another
    variation = root / "open_drawer" / "variation1"
    variation.mkdir(parents=True)
    with open(variation / "variation_descriptions.pkl", "wb") as f:
        pickle.dump(["open the middle drawer", "grip the middle handle"], f)
    write_episode(variation / "episodes" / "episode0", _observations(6), images=_images(6))
    for m in (0, 1):
        write_episode(root / "close_jar" / "all_variations" / "episodes" / f"episode{m}", _observations(4, m),
                      images=_images(4), descriptions=["close the red jar"], variation_number=m + 2, protocol=2)
    return root


def test_both_layouts_and_observations_round_trip(data_root):
    upstream = list_episodes(data_root / "open_drawer")
    assert [(e.variation, e.path.name) for e in upstream] == [(1, "episode0")]
    demo = upstream[0].demo()
    expected = _observations(6)
    assert len(demo) == 6
    np.testing.assert_array_equal(demo[3].joint_velocities, expected[3]["joint_velocities"])
    assert demo[4].gripper_open == 0.0 and demo[0].front_rgb is None
    assert upstream[0].descriptions()[0] == "open the middle drawer"
    forked = list_episodes(data_root / "close_jar")
    assert [(e.variation, e.path.name) for e in forked] == [(2, "episode0"), (3, "episode1")]
    np.testing.assert_array_equal(forked[1].rgb("front", 3), np.full((8, 8, 3), 3))
    np.testing.assert_allclose(forked[1].depth("front", 0, near=0.1, far=4.0), 0.1 + 0.25 * 3.9, atol=1e-6)


def test_depth_encoding_is_24_bit_rgb():
    assert decode_depth(np.array([[[0, 1, 0]]], np.uint8), 0.0, 1.0)[0, 0] == pytest.approx(256 / (2**24 - 1))
    np.testing.assert_array_equal(encode_depth(np.array([1.0])), [[255, 255, 255]])
    value = np.array([0.123456])
    assert decode_depth(encode_depth(value), 0.0, 1.0)[0] == pytest.approx(0.123456, abs=1e-7)


def test_foreign_globals_are_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            import subprocess

            return (subprocess.call, (["true"],))

    path = tmp_path / "low_dim_obs.pkl"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UnsafePickleError, match=r"low_dim_obs\.pkl: refusing to load global subprocess\.call"):
        load_rlbench_pickle(path)
    path.write_bytes(pickle.dumps([1, 2, 3])[:-3])
    with pytest.raises(RLBenchFormatError, match="corrupt or truncated"):
        load_rlbench_pickle(path)


class _Obs:
    def __init__(self, gripper, velocity):
        self.gripper_open, self.joint_velocities = gripper, np.full(7, velocity)


class _Demo:
    def __init__(self, observations):
        self.observations = observations


def test_keyframes_follow_perACTs_rule():
    moving, still = 1.0, 0.01
    # frames 0-2 move, 3 stops, 4-5 move, 6 closes the gripper, 7-8 still: 7 is within 4 frames of the stop at 3,
    # so the stop registers at 8; 9-10 move, 11 is the last frame
    frames = [(1, moving)] * 3 + [(1, still)] + [(1, moving)] * 2 + [(0, moving)] + [(0, still)] * 2 \
        + [(0, moving)] * 2 + [(0, moving)]
    demo = _Demo([_Obs(g, v) for g, v in frames])
    assert keyframes(demo) == [3, 6, 8, 11]
    # the second-to-last keyframe is dropped when it is adjacent to the last
    closing = _Demo([_Obs(1, moving)] * 4 + [_Obs(0, moving)] * 2)
    assert keyframes(closing) == [5]


def test_llarva_prompt_and_answer_are_verbatim():
    history = [[0.0] * 7] * 4 + [[0.1234, -0.5, 1.0, 0.0, 0.25, 2.0, -1.0]]
    assert llarva_prompt("open the drawer", history) == (
        '<image>\nYou are a Franka robot using the joint control. The task is "open the drawer", and the previous '
        "five (including current) steps are [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "
        "[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "
        "[0.1234, -0.5, 1.0, 0.0, 0.25, 2.0, -1.0]]. Can you predict action of the next 1 step?")
    assert llarva_prompt("x", history, visual_trace=True).endswith(
        "Can you predict action of the next 1 step and the trajectories of the end effector?")
    assert llarva_answer([0.1, -0.2, 0, 0, 0, 0, 0.3, 1.0]) == \
        "The next action step: [0.1, -0.2, 0, 0, 0, 0, 0.3, 1.0]"
    assert llarva_answer([0.5] * 8, [[10, 20], [11, 21]]).endswith(". The trajectory: [[10, 20], [11, 21]]")


def test_parse_llarva_action_falls_back_and_counts():
    action, ok = parse_llarva_action("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.0]")
    assert ok and action[-1] == 0.0 and action[0] == pytest.approx(0.1)
    action, ok = parse_llarva_action("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]")
    assert ok and action[-1] == 1.0
    for garbage in ("no list here", "[0.1, nan, 0.3]", "[0.1, 0.2", "The next action step: [a, b]"):
        action, ok = parse_llarva_action(garbage, previous_gripper=0.0)
        assert not ok and not action[:7].any() and action[7] == 0.0


def test_projection_is_a_pinhole():
    pixels = project_points(np.array([[0.1, -0.2, 1.0], [0.0, 0.0, 2.0]]), np.eye(4), K)
    np.testing.assert_array_equal(pixels, [[74, 44], [64, 64]])
    moved_camera = np.eye(4)
    moved_camera[0, 3] = 0.1  # camera 10 cm along x: the same point appears 10 px further left
    np.testing.assert_array_equal(project_points(np.array([[0.1, -0.2, 1.0]]), moved_camera, K), [[64, 44]])


def test_episode_records(data_root):
    episode = list_episodes(data_root / "open_drawer")[0]
    records = episode_records(episode, image_root=data_root, rng=np.random.default_rng(7))
    assert len(records) == 5  # every frame but the last
    observations = _observations(6)
    noise = np.random.default_rng(7).normal(0, 0.01, 7)
    first_history = [round(float(v), 4) for v in observations[0]["joint_positions"] + noise]
    assert records[0]["conversations"][0]["value"] == llarva_prompt("open the middle drawer",
                                                                    [[0.0] * 7] * 4 + [first_history])
    expected_action = [round(float(v), 4) for v in np.append(observations[3]["joint_velocities"], 0.0)]
    assert records[2]["conversations"][1]["value"] == llarva_answer(expected_action)
    assert records[2]["image"] == "open_drawer/variation1/episodes/episode0/front_rgb/2.png"
    traced = episode_records(episode, visual_trace_answers=True, rng=np.random.default_rng(0))
    # gripper moves 5 cm along x per frame at 1 m depth: 5 px per frame from the centre column
    assert traced[1]["conversations"][1]["value"].endswith(
        ". The trajectory: [[69, 64], [74, 64], [79, 64], [84, 64], [89, 64]]")


def test_write_llarva_annotations(data_root, tmp_path):
    count = write_llarva_annotations(data_root, ["open_drawer", "close_jar"], tmp_path / "llarva.json", seed=1)
    records = json.loads((tmp_path / "llarva.json").read_text())
    assert count == len(records) == 5 + 3 + 3
    assert len({r["id"] for r in records}) == count
