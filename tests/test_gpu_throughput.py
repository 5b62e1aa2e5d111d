"""The GPU throughput benchmark's FLOP count and step, checked on CPU on shrunken real-size configurations."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from affordvla.backbones.finetuning import LoraSettings, apply_lora
from affordvla.bench import gpu_throughput
from affordvla.bench.gpu_throughput import (
    FAMILIES,
    StepShape,
    lora_step_flops,
    lora_step_inputs,
    measure,
    real_size_backbone,
    real_size_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHRINK = {"image_size": 56, "patch_size": 14, "vision_hidden": 64, "vision_intermediate": 128, "vision_layers": 2,
          "vision_heads": 2, "hidden": 64, "intermediate": 128, "layers": 4, "heads": 4, "vocab": 2048}


def test_real_sizes_are_the_published_ones():
    paligemma = real_size_config("paligemma", 257152)
    assert (paligemma.text_config.hidden_size, paligemma.text_config.num_hidden_layers) == (2048, 18)
    assert (paligemma.vision_config.hidden_size, paligemma.vision_config.image_size) == (1152, 224)
    llava = real_size_config("llava", 32000)
    assert (llava.text_config.hidden_size, llava.vision_config.image_size, llava.image_seq_length) == (4096, 336, 576)
    cogvlm = real_size_config("cogvlm", None)
    assert (cogvlm.hidden_size, cogvlm.vision.num_hidden_layers, cogvlm.vision.image_size) == (4096, 63, 490)


@pytest.mark.parametrize("family", FAMILIES)
def test_step_flops_match_the_counted_matrix_products(family, tmp_path):
    shrink = {**SHRINK, **({"kv_heads": 1, "head_dim": 16} if family == "paligemma" else {})}
    backbone = real_size_backbone(family, "cpu", torch.float32, tmp_path, **shrink)
    assert backbone.model.config.get_text_config().num_hidden_layers == 4
    apply_lora(backbone, LoraSettings(**gpu_throughput.LORA))
    head, pixels, inputs = lora_step_inputs(backbone, 2, "cpu", torch.float32)
    answer = int((inputs["labels"] != -100).sum(dim=1).max()) + 1
    # attention through the math kernel, so the counter sees its matrix products (the CPU flash kernel has no
    # formula, and flash recomputes the scores in the backward pass, which model FLOPs do not count)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = backbone(pixels, inputs, logits_to_keep=answer)
        head.loss(out.logits, inputs["labels"])["loss"].backward()
    shape = StepShape(batch=2, positions=inputs["input_ids"].shape[1], patches=16, answer=answer)
    # within 2%: the count gives the first decoder layer an input-gradient pass that autograd skips
    assert lora_step_flops(backbone, shape) == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_measure_times_a_lora_step(tmp_path):
    result = measure("llava", batch_size=2, steps=2, warmup=1, device="cpu", dtype=torch.float32, **SHRINK)
    assert result["step_s"] > 0 and result["tokens_per_s"] > 0
    assert result["flops_per_s"] == pytest.approx(result["step_flops"] / result["step_s"])


def test_peak_is_looked_up_by_device_name_or_set(monkeypatch):
    monkeypatch.delenv("AFFORDVLA_PEAK_TFLOPS", raising=False)
    assert gpu_throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_throughput.peak_flops("Some Other GPU") is None
    monkeypatch.setenv("AFFORDVLA_PEAK_TFLOPS", "100")
    assert gpu_throughput.peak_flops("Some Other GPU") == 100e12


def test_without_a_gpu_nothing_is_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_throughput.run() == {}
