"""LoRA, adapters, export, gradient checkpointing and quantisation errors, on the tiny backbones."""

import json

import pytest
import torch
from conftest import assert_learned

from affordvla.backbones.factory import load_backbone
from affordvla.backbones.finetuning import (
    LoraSettings,
    export_backbone,
    lora_target_regex,
    quantization_kwargs,
)
from affordvla.offline.tiny_llava import write_tiny_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny", image_size=32, patch_size=8, hidden_size=32,
                            vision_layers=2, text_layers=2)


def _batch(backbone):
    pixels = torch.randn(2, 3, 32, 32)
    return pixels, backbone.build_inputs(["point to the cup", "point"], ["[(0.1, 0.2)]", "[(0.3, 0.4)]"])


def _loss(backbone, pixels, inputs):
    logits = backbone.forward(pixels, inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["labels"][:, 1:].reshape(-1))


def test_lora_targets_only_the_language_model_unless_asked(llava_dir):
    backbone = load_backbone("llava", str(llava_dir), lora={"rank": 4, "alpha": 8})
    names = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and n.startswith("model.language_model.") for n in names)
    assert any(n.endswith("q_proj.lora_A.default.weight") for n in names)
    assert any(n.endswith("down_proj.lora_B.default.weight") for n in names)
    parts = backbone.parameter_parts()  # adapters keep their part prefixes: per-part learning rates still apply
    assert len(parts["language_model"]) == len(names) and not parts["vision_tower"]
    with_tower = load_backbone("llava", str(llava_dir), lora={"rank": 4, "vision_tower": True,
                                                             "extra_trainable": ["projector"]})
    trainable = [n for n, p in with_tower.model.named_parameters() if p.requires_grad]
    assert any(n.startswith("model.vision_tower.") and "fc1.lora_A" in n for n in trainable)
    assert {n for n in trainable if "lora_" not in n} == {f"model.multi_modal_projector.linear_{i}.{w}"
                                                          for i in (1, 2) for w in ("weight", "bias")}
    regex = lora_target_regex(backbone, LoraSettings())
    assert regex.startswith("^(?:(?:model\\.language_model|lm_head)\\..*\\.(?:q_proj|")


def test_lora_training_then_merged_export_loads_in_plain_transformers(llava_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    backbone = load_backbone("llava", str(llava_dir), lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    pixels, inputs = _batch(backbone)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    first = _loss(backbone, pixels, inputs).item()
    for _ in range(30):
        loss = _loss(backbone, pixels, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    backbone.eval()
    with torch.no_grad():
        tuned = backbone.forward(pixels, inputs).logits
    # only the adapters learn; a random tiny model with a frozen output layer cannot go far below log(vocab)
    assert_learned("lora/llava_loss_drop", -(first - loss.item()), -0.3, (first, loss.item()))
    adapter_dir = export_backbone(backbone, tmp_path / "adapter", merge=False)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert json.loads((adapter_dir / "affordvla_adapter.json").read_text())["family"] == "llava"
    merged_dir = export_backbone(backbone, tmp_path / "merged", merge=True)
    plain = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        merged = plain(pixel_values=pixels, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=inputs["position_ids"]).logits
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-4)
    # the unmerged adapter on top of the untouched base gives the same model
    reloaded = load_backbone("llava", str(llava_dir), adapter=str(adapter_dir))
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward(pixels, inputs).logits, tuned, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(llava_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = load_backbone("llava", str(llava_dir), gradient_checkpointing=checkpointing)
        backbone.train()
        pixels, inputs = _batch(backbone)
        _loss(backbone, pixels, inputs).backward()
        grads.append(backbone.model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_quantisation_and_conflicting_options_are_explained(llava_dir):
    assert quantization_kwargs(None) == {}
    with pytest.raises(ValueError, match="must be null, '4bit' or '8bit'"):
        quantization_kwargs("2bit")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU; none is available"):
            load_backbone("llava", str(llava_dir), quantization="4bit")
    with pytest.raises(ValueError, match="either backbone.lora .* or backbone.adapter"):
        load_backbone("llava", str(llava_dir), lora={"rank": 2}, adapter="/x")
