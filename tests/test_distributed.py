"""Multi-process training: samplers and streams shard without duplicates, strategies compose and build, and DDP
over 2 CPU processes trains to the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from hydra.types import RunMode
from hydra.utils import instantiate

from affordvla.data.sampling import StepResumableSampler

# ------------------------------------------------------------------------------------------------ sampling


def _epoch(sampler: StepResumableSampler) -> list[int]:
    return list(sampler)


@pytest.mark.parametrize("num_samples,batch", [(40, 2), (43, 3)])
def test_ranks_cover_each_index_once_per_epoch_and_match_one_process(num_samples, batch):
    world = 2
    ranks = [StepResumableSampler(num_samples, batch, seed=7, rank=r, world_size=world) for r in range(world)]
    single = StepResumableSampler(num_samples, batch * world, seed=7, rank=0, world_size=1)
    shards = [_epoch(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == (num_samples // (batch * world)) * batch
    counts = Counter(shards[0] + shards[1])
    assert set(counts.values()) == {1}  # disjoint, nothing twice
    used = (num_samples // (batch * world)) * batch * world
    assert sorted(counts) == sorted(single.permutation(0)[:used])  # complete (up to the dropped last batch)
    # step by step, the ranks' batches put together are the single process's batch of the same step
    one = _epoch(single)
    for step in range(len(shards[0]) // batch):
        together = shards[0][step * batch:(step + 1) * batch] + shards[1][step * batch:(step + 1) * batch]
        assert together == one[step * batch * world:(step + 1) * batch * world]


def test_distributed_sampler_resumes_at_the_step_and_crosses_epochs():
    done = {"batches": 0}

    def make(r):
        return StepResumableSampler(20, 2, seed=3, batches_done=lambda: done["batches"], rank=r, world_size=2,
                                    with_epoch=True)

    full = [_epoch(make(r)) for r in range(2)]  # 5 steps of 2 x 2 per epoch
    done["batches"] = 3
    resumed = [_epoch(make(r)) for r in range(2)]
    assert resumed == [shard[3 * 2:] for shard in full]
    assert {epoch for _, epoch in resumed[0]} == {0}
    done["batches"] = 7  # epoch 1, step 2: a new permutation, still disjoint across ranks
    later = [_epoch(make(r)) for r in range(2)]
    assert {epoch for shard in later for _, epoch in shard} == {1}
    indices = [i for shard in later for i, _ in shard]
    assert len(indices) == len(set(indices)) == 3 * 2 * 2
    assert len(make(0)) == 3 * 2


def test_sampler_reads_rank_from_the_process_group_and_lightning_leaves_it_alone(tmp_path):
    import torch.distributed as dist
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
    from torch.utils.data import DataLoader

    sampler = StepResumableSampler(16, 2, seed=0)
    assert (sampler.rank, sampler.world_size) == (0, 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert (sampler.rank, sampler.num_replicas) == (0, 1)

        class Connector:  # what _requires_distributed_sampler reads of the trainer
            class _accelerator_connector:
                use_distributed_sampler = True
                is_distributed = True

        loader = DataLoader(list(range(16)), batch_size=2, sampler=sampler)
        assert not _DataConnector(Connector())._requires_distributed_sampler(loader)
        plain = DataLoader(list(range(16)), batch_size=2, shuffle=True)
        assert _DataConnector(Connector())._requires_distributed_sampler(plain)  # would be wrapped
    finally:
        dist.destroy_process_group()


def test_sampler_refuses_a_set_smaller_than_the_global_batch():
    with pytest.raises(ValueError, match="fewer than one batch of 4 x 2 ranks"):
        StepResumableSampler(7, 4, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="outside a world of 2"):
        StepResumableSampler(40, 4, seed=0, rank=2, world_size=2)


# ------------------------------------------------------------------------------------------------ OXE


@pytest.mark.parametrize("shards,consumers", [(4, 4), (4, 2), (4, 3), (2, 4), (3, 5)])
def test_oxe_consumers_get_disjoint_complete_shares(tmp_path, shards, consumers):
    from test_oxe import _fractal_episode

    from affordvla.data.oxe import RLDSDataset, write_rlds_dataset

    write_rlds_dataset(tmp_path, "fractal20220817_data", {"train": [_fractal_episode(s) for s in range(11)],
                                                          "val": [_fractal_episode(0)]}, shards=shards)
    data = RLDSDataset.open(tmp_path, "fractal20220817_data")
    everything = [where for where, _ in data.episode_records("train")]
    shares = [[where for where, _ in data.episode_records("train", rank=r, world_size=consumers)]
              for r in range(consumers)]
    assert all(shares), "every consumer gets episodes"
    assert sorted(w for share in shares for w in share) == sorted(everything)  # complete, nothing twice
    if consumers <= shards:  # each consumer reads whole shards only
        for share in shares:
            files = {w.split(", record")[0] for w in share}
            assert all(sum(w.startswith(f) for w in everything) == sum(w.startswith(f) for w in share) for f in files)


# ------------------------------------------------------------------------------------------------ strategies


def test_trainer_configs_compose(tmp_path):
    ddp = compose_train(["trainer=ddp_cpu", f"paths.root_dir={tmp_path}"], tmp_path / "a")
    assert ddp.trainer.strategy.process_group_backend == "gloo" and ddp.trainer.accelerator == "cpu"
    assert ddp.trainer.devices == 2 and not ddp.trainer.use_distributed_sampler
    gpu = compose_train(["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"], tmp_path / "b")
    assert gpu.trainer.strategy.process_group_backend == "nccl" and gpu.trainer.num_nodes == 4
    fsdp = compose_train(["trainer=fsdp"], tmp_path / "c")
    assert fsdp.trainer.strategy._target_ == "affordvla.distributed.fsdp_strategy"
    assert (fsdp.trainer.strategy.param_dtype, fsdp.trainer.strategy.reduce_dtype) == ("bfloat16", "float32")
    deepspeed = compose_train(["trainer=deepspeed"], tmp_path / "d")
    assert deepspeed.trainer.strategy.stage == 2


def test_deepspeed_without_the_package_says_what_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    cfg = compose_train(["trainer=deepspeed"], tmp_path / "run")
    with pytest.raises(Exception, match="needs the deepspeed package") as info:
        instantiate(cfg.trainer.strategy)
    assert "pip install deepspeed" in str(info.value)


def test_fsdp_strategy_wraps_the_backbones_own_blocks(tiny_backbone_dir):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed import fsdp
    from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone
    from affordvla.distributed import fsdp_strategy, wants_backbone

    backbone = PaliGemmaBackbone.from_pretrained(tiny_backbone_dir)
    assert backbone.decoder_layer_classes == (GemmaDecoderLayer,)
    assert backbone.vision_layer_classes == (SiglipEncoderLayer,)
    assert wants_backbone(fsdp_strategy)
    strategy = fsdp_strategy(backbone)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.mixed_precision == fsdp.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                           buffer_dtype=torch.float32)
    wrapped = strategy.kwargs["auto_wrap_policy"]
    assert set(wrapped._module_classes) == {GemmaDecoderLayer, SiglipEncoderLayer}
    assert set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == {GemmaDecoderLayer}
    text_only = fsdp_strategy(backbone, wrap_vision_layers=False, activation_checkpointing=False)
    assert set(text_only.kwargs["auto_wrap_policy"]._module_classes) == {GemmaDecoderLayer}
    assert "auto_wrap_policy" not in text_only._activation_checkpointing_kwargs


def test_every_family_names_block_classes_its_model_has():
    from affordvla.backbones.cogvlm.modeling import (
        CogVLMBackbone,
        CogVLMDecoderLayer,
        EVA2CLIPLayer,
    )
    from affordvla.backbones.llava.modeling import LlavaBackbone
    from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone

    assert CogVLMDecoderLayer.__name__ in CogVLMBackbone.decoder_layer_names
    assert EVA2CLIPLayer.__name__ in CogVLMBackbone.vision_layer_names
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert LlamaDecoderLayer.__name__ in LlavaBackbone.decoder_layer_names
    assert CLIPEncoderLayer.__name__ in LlavaBackbone.vision_layer_names
    assert Gemma2DecoderLayer.__name__ in PaliGemmaBackbone.decoder_layer_names  # PaliGemma 2


def test_a_multirun_refuses_ddp_that_would_relaunch_the_sweep(tmp_path):
    import lightning as L

    from affordvla.distributed import check_launch_under_hydra

    cfg = compose_train(["trainer=ddp_cpu", f"paths.root_dir={tmp_path}"], tmp_path / "run")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, L.Trainer)
    check_launch_under_hydra(trainer, RunMode.RUN)  # a single run may launch its ranks
    with pytest.raises(ValueError, match="would re-run the whole sweep"):
        check_launch_under_hydra(trainer, RunMode.MULTIRUN)
    one = instantiate(cfg.trainer, devices=1, logger=False, enable_checkpointing=False)
    check_launch_under_hydra(one, RunMode.MULTIRUN)  # one device: nothing is launched


# ------------------------------------------------------------------------------------------------ DDP end to end


def _train(tmp_path: Path, backbone: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, AFFORDVLA_ROOT=str(tmp_path), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "affordvla.train", "debug=smoke", "test=false", "backbone.build=null",
               f"backbone.pretrained={backbone}", "dataset.generate.image_size=64",
               "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run_dir}", *args]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, tiny_backbone_dir):
    """2 ranks x batch 2 (gloo) against 1 process x batch 4, same seed: each step's global batch is the same
    samples, so the weights after 4 steps agree to float rounding; rank-zero outputs exist once."""
    from mlflow import MlflowClient

    from affordvla.checkpointing import load_state_dict

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _train(tmp_path, tiny_backbone_dir, single, "dataset.batch_size=4", "logger=none")
    _train(tmp_path, tiny_backbone_dir, ddp, "trainer=ddp_cpu", "trainer.devices=2", "dataset.batch_size=2")

    start = load_state_dict(single / "checkpoints" / "step_000002" / "model.safetensors")
    one = load_state_dict(single / "checkpoints" / "step_000004" / "model.safetensors")
    two = load_state_dict(ddp / "checkpoints" / "step_000004" / "model.safetensors")
    assert one.keys() == two.keys()
    trained = max((one[k] - start[k]).abs().max().item() for k in one)
    assert trained > 5e-4  # steps 3-4 moved the weights well beyond the tolerance below
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=key)

    # rank-zero outputs: one MLflow run, finished, with its metrics and files; one export; one metrics.json
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("affordvla-train").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert {"run/run_info.json", "run/metrics.json"} <= {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert json.loads((ddp / "run_info.json").read_text())["world_size"] == 2
    # every rank evaluates the whole split: the metrics are one process's (same weights up to rounding)
    one_metrics, two_metrics = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp))
    assert two_metrics["val/num_samples"] == one_metrics["val/num_samples"] == 8
    assert two_metrics["val/mean_baseline_error"] == pytest.approx(one_metrics["val/mean_baseline_error"])
    assert (ddp / "model" / "model.safetensors").is_file()
