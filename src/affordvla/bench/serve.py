"""`make bench BENCH=serve`: affordvla-serve on localhost with the tiny default (a keypoint-text PaliGemma) and a
tiny LSTM action policy, each trained a few steps and exported; bounded request counts.

Figures: keypoint latency (p50, p95) and throughput at 1 and 16 concurrent clients with batching on; the same
16-client throughput with batching off (max_batch_size=1, a second server of the same exports) gives
`batching_speedup`; /act latency over session steps; errors over every request (must be 0); and the server's RSS
(all its processes) after 2000 keypoint requests over after the first 100.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from affordvla.serve.client import PolicyClient
from affordvla.serve.launch import ServerProcess, free_port, serve_command

log = logging.getLogger("affordvla.bench.serve")
WORK = Path("outputs/bench/work/serve")
INSTRUCTION = "Sweep the trash off the table with the brush."
LATENCY_REQUESTS = 100
CONCURRENT = 16
CONCURRENT_REQUESTS = 320
# the RSS figure's request count; fewer where the cores are too slow for the few minutes the benchmark should take
RSS_TOTAL = int(os.environ.get("AFFORDVLA_BENCH_SERVE_REQUESTS", "2000"))
ACT_EPISODES, ACT_STEPS = 5, 20
# a phase stops sending after this many seconds; its figure counts what was sent
PHASE_SECONDS = float(os.environ.get("AFFORDVLA_BENCH_SERVE_PHASE_SECONDS", "300"))


def _export(name: str, overrides: list[str]) -> Path:
    """A tiny policy trained a few steps and exported (kept for the next run of the benchmark)."""
    export = WORK / name
    if not (export / "policy.json").is_file():
        subprocess.run([sys.executable, "-m", "affordvla.train", f"task_name=bench_serve_{name}", "test=false",
                        "logger=none", "callbacks.progress_bar.refresh_rate=0", f"export_dir={export.resolve()}",
                        *overrides], check=True)
    return export


def _image(seed: int, size: int = 128) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


class _Counter:
    def __init__(self):
        self.requests = self.errors = 0

    def call(self, function, *args, **kwargs) -> float | None:
        """Seconds of one call, or None when it failed (counted)."""
        self.requests += 1
        started = time.perf_counter()
        try:
            function(*args, **kwargs)
        except Exception as exc:  # any failure is an error of the server under test
            self.errors += 1
            log.warning("request failed: %s", exc)
            return None
        return time.perf_counter() - started


def _sequential(url: str, count: int, counter: _Counter) -> list[float]:
    deadline = time.monotonic() + PHASE_SECONDS
    times = []
    with PolicyClient(url, retries=0) as client:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            times.append(counter.call(client.keypoints, _image(i % 8), INSTRUCTION))
    return [t for t in times if t is not None]


def _concurrent(url: str, count: int, counter: _Counter) -> tuple[float, int]:
    """Requests per second of up to `count` keypoint requests from CONCURRENT clients, and how many were sent."""
    clients = [PolicyClient(url, retries=0) for _ in range(CONCURRENT)]
    deadline = time.monotonic() + PHASE_SECONDS
    sent = []

    def one(i: int) -> None:
        if time.monotonic() < deadline:
            sent.append(counter.call(clients[i % CONCURRENT].keypoints, _image(i % 8), INSTRUCTION))

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    return len(sent) / elapsed, len(sent)


def _act_latencies(url: str, counter: _Counter) -> list[float]:
    times = []
    with PolicyClient(url, retries=0) as client:
        for episode in range(ACT_EPISODES):
            session = f"bench-{episode}"
            counter.call(client.reset, session, model="lstm")
            for step in range(ACT_STEPS):
                elapsed = counter.call(client.act, _image(step, 64), "push the block", session=session,
                                       model="lstm")
                if elapsed is not None:
                    times.append(elapsed)
    return times


def _server(models: dict[str, Path], batch: int, name: str) -> ServerProcess:
    port = free_port()
    server = ServerProcess(serve_command(models, port, ["accelerator=cpu", f"max_batch_size={batch}",
                                                        "batch_timeout=0.005", "demo.enabled=false",
                                                        "api_key_env=null"]),
                           port, WORK / f"{name}.log")
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server


def run() -> dict[str, float]:
    keypoints = _export("keypoints", ["debug=smoke", "dataset.generate.image_size=64"])
    # the LSTM policy on the default's backbone (the keypoint export is a plain checkpoint): no pre-training
    models = {"kp": keypoints,
              "lstm": _export("lstm", ["experiment=toy_actions_lstm", f"backbone.pretrained={keypoints.resolve()}",
                                       "backbone.build=null", "dataset.generate.train_episodes=2",
                                       "dataset.generate.val_episodes=1", "dataset.generate.episode_length=8",
                                       "dataset.batch_size=4", "trainer.max_steps=3", "trainer.val_check_interval=3",
                                       "head.hidden_size=16"])}
    counter = _Counter()
    figures: dict[str, float] = {}
    with _server(models, CONCURRENT, "batched") as server:
        _sequential(server.url, 5, _Counter())  # warm-up, not counted
        latencies = np.array(_sequential(server.url, LATENCY_REQUESTS, counter)) * 1000.0
        figures["serve.keypoints.p50_ms"] = float(np.percentile(latencies, 50))
        figures["serve.keypoints.p95_ms"] = float(np.percentile(latencies, 95))
        figures["serve.keypoints.rps_c1"] = float(1000.0 / latencies.mean())
        rss_first = server.rss_bytes()  # after the first 100 measured requests (and the warm-up)
        figures["serve.keypoints.rps_c16"], sent = _concurrent(server.url, CONCURRENT_REQUESTS, counter)
        more = _concurrent(server.url, max(0, RSS_TOTAL - len(latencies) - sent), counter)[1]
        figures["serve.rss_growth_ratio"] = server.rss_bytes() / rss_first
        figures["serve.rss_requests"] = float(len(latencies) + sent + more)
        act = np.array(_act_latencies(server.url, counter)) * 1000.0
        figures["serve.act.p95_ms"] = float(np.percentile(act, 95))
    with _server(models, 1, "batch1") as server:
        _sequential(server.url, 5, _Counter())
        figures["serve.keypoints.rps_c16_batch1"] = _concurrent(server.url, CONCURRENT_REQUESTS, counter)[0]
    figures["serve.batching_speedup"] = figures["serve.keypoints.rps_c16"] / figures["serve.keypoints.rps_c16_batch1"]
    figures["serve.errors"] = float(counter.errors)
    figures["serve.requests"] = float(counter.requests)
    return figures
