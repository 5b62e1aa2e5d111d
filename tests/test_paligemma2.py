"""PaliGemma 2 (a Gemma 2 decoder behind SigLIP) through the same backbone: the tiny checkpoint, its attention,
learning with the keypoint head, and a merged LoRA export that plain transformers loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_learned, fell_by, keypoint_head_and_batch, overfit_keypoint_batch
from transformers import PaliGemmaForConditionalGeneration

from affordvla.backbones.factory import load_backbone
from affordvla.backbones.finetuning import export_backbone
from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone
from affordvla.offline.tiny_paligemma import write_tiny_paligemma


@pytest.fixture(scope="module")
def paligemma2_dir(tmp_path_factory):
    return write_tiny_paligemma(tmp_path_factory.mktemp("paligemma2") / "tiny", image_size=32, patch_size=8,
                                hidden_size=32, vision_layers=1, text_layers=2, intermediate_size=64, kv_heads=2,
                                text_model="gemma2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_checkpoint_is_paligemma2(paligemma2_dir):
    config = json.loads((paligemma2_dir / "config.json").read_text())
    assert config["model_type"] == "paligemma" and config["text_config"]["model_type"] == "gemma2"
    text = config["text_config"]
    assert text["final_logit_softcapping"] == 30.0 and text["attn_logit_softcapping"] == 50.0
    assert text["layer_types"] == ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="valid: gemma .*gemma2"):
        write_tiny_paligemma(paligemma2_dir.parent / "bad", text_model="gemma3")


@pytest.mark.parametrize("prefix_lm", [True, False])
def test_attention_is_prefix_lm_or_causal_as_asked(paligemma2_dir, prefix_lm):
    """Changing a later token never changes earlier answer logits; with the prefix-LM the image and prompt also
    see the whole prompt, with causal attention they do not."""
    backbone = PaliGemmaBackbone.from_pretrained(paligemma2_dir, prefix_lm=prefix_lm).eval()
    pixels = torch.randn(1, 3, 32, 32)
    inputs = backbone.build_inputs(["point to the cup"], ["<loc0001><loc0002><loc0003>"])
    changed = {k: v.clone() for k, v in inputs.items()}
    last_answer = int((inputs["labels"][0] != -100).nonzero()[-2])  # the last <loc>, before <eos>
    changed["input_ids"][0, last_answer] = backbone.tokenizer.convert_tokens_to_ids("<loc0999>")
    prompt_end = int((inputs["labels"][0] != -100).nonzero()[0]) - 1
    changed_prompt = {k: v.clone() for k, v in inputs.items()}
    changed_prompt["input_ids"][0, prompt_end] = backbone.tokenizer.convert_tokens_to_ids("<loc0500>")
    with torch.no_grad():
        logits = backbone.forward(pixels, inputs).logits
        after_answer_change = backbone.forward(pixels, changed).logits
        after_prompt_change = backbone.forward(pixels, changed_prompt).logits
    torch.testing.assert_close(after_answer_change[0, :last_answer], logits[0, :last_answer])
    first_image_row_moved = not torch.allclose(after_prompt_change[0, 0], logits[0, 0])
    assert first_image_row_moved == prefix_lm


def test_paligemma2_overfits_a_batch_with_the_keypoint_head(paligemma2_dir):
    torch.manual_seed(0)
    backbone = load_backbone("paligemma", str(paligemma2_dir), prefix_lm=False)
    head, samples, batch = keypoint_head_and_batch(backbone, codec="paligemma_loc")
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)
    losses = overfit_keypoint_batch(backbone, head, batch, optimizer, steps=150)
    assert_learned("overfit/paligemma2", fell_by(losses), 1 / 20, losses[::10])
    backbone.eval()
    texts, points = head.predict(backbone, batch["pixel_values"][:2], samples[:2])
    assert texts == [head.target_text(s) for s in samples[:2]]
    np.testing.assert_allclose(points[0], samples[0].keypoints, atol=1e-3)


def test_merged_lora_export_loads_in_plain_transformers(paligemma2_dir, tmp_path):
    torch.manual_seed(0)
    backbone = load_backbone("paligemma", str(paligemma2_dir), lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    head, _, batch = keypoint_head_and_batch(backbone, codec="paligemma_loc")
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    losses = overfit_keypoint_batch(backbone, head, batch, optimizer, steps=5)
    assert_learned("overfit/paligemma2_lora_5_steps", fell_by(losses), 1.0, losses)  # the adapters moved it
    backbone.eval()
    pixels, inputs = batch["pixel_values"], batch["inputs"]
    with torch.no_grad():
        tuned = backbone.forward(pixels, inputs).logits
    plain = PaliGemmaForConditionalGeneration.from_pretrained(export_backbone(backbone, tmp_path / "merged",
                                                                              merge=True)).eval()
    assert type(plain.model.language_model).__name__ == "Gemma2Model"
    with torch.no_grad():
        merged = plain(pixel_values=pixels, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       token_type_ids=inputs["token_type_ids"], position_ids=inputs["position_ids"]).logits
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-4)
