"""Closed-loop rollouts: the toy simulator replays the generated dataset, the expert solves it and a random agent
does not, CALVIN-style chain counting, image strips, simulator adapters without their packages, and
`affordvla-eval rollout` end to end on a tiny trained policy."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil

import numpy as np
import pytest
from conftest import compose_train
from PIL import Image

from affordvla.evaluate import main
from affordvla.evaluation.rollouts import STRIP_COLUMNS, run_chains, run_episodes
from affordvla.offline.toy_actions import (
    GENERATOR_VERSION,
    START_HEIGHT,
    generate_episode,
)
from affordvla.offline.toy_env import (
    LIFT_HEIGHT,
    RandomAgent,
    ToyActionEnv,
    ToyExpertAgent,
)

# --- the refactored generator writes the same data --------------------------------------------------------------

# sha256 over 3 episodes each of (seed 0, 1 distractor) and (seed 3, 2 distractors), every frame key and array,
# computed with the generator before it was split into reusable pieces. A change here means the dataset changed:
# bump GENERATOR_VERSION and record the new digest together.
DIGESTS = {2: "dde9c4c1b012b2ecbd8bbe10e706d5d727c0952111bb2cc3f3b9d2e93caf8aa7"}


def _episodes_digest() -> str:
    h = hashlib.sha256()
    for seed, distractors in ((0, 1), (3, 2)):
        rng = np.random.default_rng(seed)
        for _ in range(3):
            frames, instruction, task = generate_episode(rng, 24, distractors)
            h.update(f"{instruction}|{task}".encode())
            for frame in frames:
                for key in sorted(frame):
                    h.update(key.encode())
                    h.update(np.ascontiguousarray(frame[key]).tobytes())
    return h.hexdigest()


def test_generated_episodes_are_unchanged_for_this_generator_version():
    assert _episodes_digest() == DIGESTS[GENERATOR_VERSION]


# --- the toy simulator ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,distractors", [(0, 1), (7, 1), (11, 2), (5, 0)])
def test_reset_and_expert_steps_replay_the_dataset_episode_exactly(seed, distractors):
    frames, instruction, _ = generate_episode(np.random.default_rng(seed), 24, distractors)
    env = ToyActionEnv(distractors=distractors)
    observation, solved_at = env.reset(seed), None
    for t, frame in enumerate(frames):
        assert observation["instruction"] == instruction
        for camera in ("rgb_static", "rgb_gripper"):
            assert observation["images"][camera].shape == frame[camera].shape
            assert np.array_equal(observation["images"][camera], frame[camera]), (t, camera)
        np.testing.assert_array_equal(observation["state"], frame["robot_obs"].astype(np.float32))
        np.testing.assert_array_equal(env.expert_action(), frame["rel_actions"])
        observation, done, info = env.step(frame["rel_actions"])
        if done and solved_at is None:  # the dataset keeps lifting after the task is solved; so does the replay
            assert info["success"] and info["grasped"] == instruction.split()[3]
            solved_at = t
    assert solved_at is not None, "the expert did not lift the block within the dataset's 24 steps"


def test_env_is_deterministic_per_seed():
    actions = np.random.default_rng(0).uniform(-1, 1, (15, 7))

    def trajectory(seed):
        env = ToyActionEnv()
        out = [env.reset(seed)]
        out += [env.step(a)[0] for a in actions]
        return out

    first, again, other = trajectory(3), trajectory(3), trajectory(4)
    for a, b in zip(first, again):
        assert a["instruction"] == b["instruction"] and np.array_equal(a["state"], b["state"])
        assert all(np.array_equal(a["images"][c], b["images"][c]) for c in a["images"])
    assert not np.array_equal(first[0]["images"]["rgb_static"], other[0]["images"]["rgb_static"])


def _move_to(env, centre):
    """Put the gripper exactly over a point (the expert's proportional steps never land exactly)."""
    env.ee = np.array(centre, dtype=float)


def test_grasp_and_lift_rules():
    env = ToyActionEnv(distractors=1)
    env.reset(0)
    target, distractor = env.scene.names
    close, lift, open_ = np.r_[0, 0, 0, 0, 0, 0, -1.0], np.r_[0, 0, 1, 0, 0, 0, -1.0], np.zeros(7)
    open_[6] = 1.0
    # closing on the distractor and lifting it is not the task
    _move_to(env, env.scene.centres[1])
    env.step(close)
    assert env.grasped == 1
    for _ in range(6):
        _, done, info = env.step(lift)
        assert not done and info["grasped"] == distractor
    # opening drops it; closing again up here grasps nothing (blocks are taken from the working height)
    env.step(open_)
    _move_to(env, env.scene.centres[0])
    assert env.step(close)[2]["grasped"] is None
    # back down, grasp the target: it succeeds on the 4th lift step (0.3 -> 0.5), not before
    env.z, env.closed, env.grasped = START_HEIGHT, False, None
    env.step(close)
    results = [env.step(lift) for _ in range(4)]
    assert [done for _, done, _ in results] == [False, False, False, True]
    assert env.z == pytest.approx(LIFT_HEIGHT) and results[-1][2]["success"]
    # a grasped block follows the gripper in xy
    before = env.scene.centres[0].copy()
    env.step(np.r_[0.5, -0.5, 0, 0, 0, 0, -1.0])
    np.testing.assert_allclose(env.scene.centres[0], before + [0.05, -0.05])


def test_expert_succeeds_and_a_random_agent_does_not():
    env = ToyActionEnv()
    expert = run_episodes(ToyExpertAgent(env), env, episodes=60, max_steps=40, seed=100, progress=False)
    assert expert.metrics()["rollout/success_rate"] >= 0.95
    assert max(expert.steps) <= 24  # within the dataset's episode length
    random = run_episodes(RandomAgent(seed=0), env, episodes=60, max_steps=40, seed=100, progress=False)
    assert random.metrics()["rollout/success_rate"] <= 0.05
    assert random.steps == [40] * 60


def test_expert_completes_chains_and_blocks_leave_the_table():
    env = ToyActionEnv()
    report = run_chains(ToyExpertAgent(env), env, chains=4, max_steps=40, seed=0, progress=False)
    assert report.results == [5, 5, 5, 5]
    metrics = report.metrics()
    assert metrics["rollout/calvin_avg_len"] == 5.0 and metrics["rollout/calvin_success_5"] == 1.0
    assert len(env.scene.names) == env.distractors  # the five delivered blocks are gone
    # every chain names five different blocks
    observation = env.reset_chain(2, 5)
    named = []
    while observation is not None:
        named.append(observation["instruction"])
        agent = ToyExpertAgent(env)
        done = False
        while not done:
            observation, done, _ = env.step(agent.act(observation))
        observation = env.advance()
    assert len(set(named)) == 5
    with pytest.raises(ValueError, match="1..5 subtasks"):
        env.reset_chain(0, 6)


class _ExpertForFirst:
    """The expert for the first k subtasks of every chain, then a gripper that never closes."""

    def __init__(self, env, solved: list[int]):
        self.env, self.solved, self.chain, self.attempts = env, list(solved), -1, []

    def reset(self):
        if self.env.subtask == 0:
            self.chain += 1
        self.attempts.append((self.chain, self.env.subtask))

    def act(self, observation):
        if self.env.subtask < self.solved[self.chain]:
            return self.env.expert_action()
        return np.r_[0.3, 0, 0, 0, 0, 0, 1.0]


def test_chain_counting_stops_at_the_first_failure_by_hand():
    env = ToyActionEnv()
    solved = [2, 0, 5, 1]
    agent = _ExpertForFirst(env, solved)
    report = run_chains(agent, env, chains=4, max_steps=30, seed=10, progress=False)
    assert report.sequences == [[True, True, False], [False], [True] * 5, [True, False]]
    assert report.results == solved
    # the agent was reset once per attempted subtask and never asked for one after a failure
    assert agent.attempts == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (3, 0), (3, 1)]
    metrics = report.metrics()
    # results 2, 0, 5, 1: >=1 in 3 of 4, >=2 in 2, >=3..5 in 1; Avg. Len. 8 / 4
    expected = [0.75, 0.5, 0.25, 0.25, 0.25]
    assert [metrics[f"rollout/calvin_success_{i}"] for i in range(1, 6)] == expected
    assert metrics["rollout/calvin_avg_len"] == 2.0 == sum(expected)


def test_frames_are_saved_as_strips(tmp_path):
    env = ToyActionEnv()
    report = run_episodes(ToyExpertAgent(env), env, episodes=3, max_steps=40, seed=0, progress=False,
                          frames_dir=tmp_path, saved=2)
    assert len(report.strips) == 2 and all(p.parent == tmp_path and "success" in p.name for p in report.strips)
    with Image.open(report.strips[0]) as image:
        strip = np.asarray(image)
    assert strip.shape == (200 + 8, STRIP_COLUMNS * 202, 3)
    assert (strip[-1, 0] == (40, 170, 60)).all()  # the success bar
    chains = run_chains(RandomAgent(0), env, chains=1, max_steps=3, seed=0, progress=False, frames_dir=tmp_path)
    with Image.open(chains.strips[0]) as image:
        assert (np.asarray(image)[-1, 0] == (200, 40, 40)).all() and chains.strips[0].name.endswith("len0.png")


def test_policy_camera_and_size_are_checked():
    from affordvla.evaluation.rollouts import check_cameras

    observation = ToyActionEnv().reset(0)
    check_cameras({"rgb_static": [200, 200, 3]}, "rgb_static", observation)
    with pytest.raises(ValueError, match=r"trained on \[100, 100, 3\] images, the environment renders \[200, 200, 3\]"):
        check_cameras({"rgb_static": [100, 100, 3]}, "rgb_static", observation)
    with pytest.raises(ValueError, match="reads camera 'front'"):
        check_cameras({}, "front", observation)


# --- simulators that are not installed --------------------------------------------------------------------------


@pytest.mark.parametrize("env,package", [("calvin", "calvin_env"), ("rlbench", "rlbench"),
                                         ("simpler", "simpler_env")])
def test_missing_simulator_gives_the_clear_message(env, package, tmp_path, capsys):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    from affordvla.evaluation.simulators import make_env

    with pytest.raises(RuntimeError, match=f"`{package}` package"):
        make_env(env, task="t", data=str(tmp_path))
    capsys.readouterr()
    assert main(["rollout", "--model", str(tmp_path), "--env", env, "--episodes", "1"]) == 1
    err = capsys.readouterr().err
    assert package in err and "not installed" in err


# --- affordvla-eval rollout end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_backbone_dir):
    """A tiny mlp policy trained through the real config (toy_actions_mlp), logged to a temporary MLflow store."""
    from mlflow import MlflowClient

    from affordvla.train import train

    root = tmp_path_factory.mktemp("rollout_run")
    overrides = ["experiment=toy_actions_mlp", f"paths.root_dir={root}", f"backbone.pretrained={tiny_backbone_dir}",
                 "backbone.build=null", "callbacks.progress_bar.refresh_rate=0", "module.callbacks.action_traces=null",
                 "dataset.generate.train_episodes=2", "dataset.generate.val_episodes=1",
                 "dataset.generate.episode_length=8", "dataset.batch_size=4", "trainer.max_steps=2",
                 "trainer.val_check_interval=2", "head.hidden_size=16"]
    train(compose_train(overrides, root / "run"))
    uri = f"sqlite:///{root}/outputs/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-toy_actions_mlp").experiment_id])
    return {"export": root / "run" / "model", "uri": uri, "run_id": run.info.run_id, "client": client}


def test_rollout_cli_from_a_run_logs_into_it(trained_run, tmp_path, capsys):
    capsys.readouterr()
    code = main(["--out", str(tmp_path / "metrics.json"), "rollout", "--run-id", trained_run["run_id"],
                 "--tracking-uri", trained_run["uri"], "--env", "toy", "--episodes", "2", "--chains", "2",
                 "--subtasks", "2", "--max-steps", "4", "--seed", "3", "--frames", str(tmp_path / "frames"),
                 "--results", str(tmp_path / "results.jsonl"), "--log-to-run", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "metrics.json").read_text())
    keys = {"rollout/success_rate", "rollout/episodes", "rollout/mean_steps", "rollout/calvin_avg_len",
            "rollout/chains", *(f"rollout/calvin_success_{i}" for i in range(1, 6))}
    assert set(printed) == keys
    assert printed["rollout/episodes"] == 2 and printed["rollout/chains"] == 2
    assert 0 <= printed["rollout/success_rate"] <= 1 and 0 <= printed["rollout/calvin_avg_len"] <= 2
    assert 1 <= printed["rollout/mean_steps"] <= 4
    # per-chain results are what `affordvla-eval calvin --results` reads: the same long-horizon figures
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["seed"] for line in lines] == [3, 4]
    assert main(["calvin", "--results", str(tmp_path / "results.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["avg_len"] == printed["rollout/calvin_avg_len"]
    # strips of the first rollouts, and the metrics + strips in the run (where affordvla-table reads them)
    strips = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert len(strips) == 4 and strips[0].startswith("chain_00003_") and strips[2].startswith("episode_00003_")
    client = trained_run["client"]
    logged = client.get_run(trained_run["run_id"]).data.metrics
    assert {k: logged[k] for k in keys} == pytest.approx(printed)
    artifacts = {a.path for a in client.list_artifacts(trained_run["run_id"], "rollout")}
    assert artifacts == {f"rollout/{name}" for name in strips}


def test_rollout_cli_from_an_export_dir_is_seeded(trained_run, tmp_path, capsys):
    args = ["rollout", "--model", str(trained_run["export"]), "--env", "toy", "--episodes", "2", "--max-steps", "3",
            "--execution", "ensemble", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert set(first) == {"rollout/success_rate", "rollout/episodes", "rollout/mean_steps"}
    # the export carries its head settings: moved away from its run's config, it loads and acts the same
    moved = shutil.copytree(trained_run["export"], tmp_path / "moved" / "model")
    assert json.loads((moved / "policy.json").read_text())["head"]["class"] == "mlp"
    assert main([*args[:2], str(moved), *args[3:]]) == 0
    assert json.loads(capsys.readouterr().out) == first
    # the errors a user can make, each with its message
    assert main(["rollout", "--model", str(tmp_path), "--env", "toy"]) == 1
    assert "not an exported policy" in capsys.readouterr().err
    assert main(["rollout", "--model", str(trained_run["export"]), "--env", "toy", "--log-to-run"]) == 1
    assert "--log-to-run needs --run-id" in capsys.readouterr().err
