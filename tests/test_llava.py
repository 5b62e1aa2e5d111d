"""The tiny LLaVA-1.5: a real checkpoint directory, Vicuna v1 prompts, CLIP-mean square padding, training, and
original-LLaVA (RoboPoint) checkpoints converted exactly."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_learned, fell_by, keypoint_head_and_batch, overfit_keypoint_batch

from affordvla.backbones.factory import load_backbone
from affordvla.backbones.llava.modeling import pad_to_square
from affordvla.offline.tiny_llava import CLIP_MEAN, write_tiny_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny", image_size=32, patch_size=8, hidden_size=32,
                            vision_layers=2, text_layers=2)


def test_checkpoint_loads_with_plain_transformers(llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Point to the bowl."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("USER: <image>\nPoint to the bowl. ASSISTANT:")
    assert text.startswith("A chat between a curious human and an artificial intelligence assistant.")
    image = np.zeros((20, 40, 3), np.uint8)
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16  # (32 / 8)^2, CLS dropped
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_square_padding_uses_the_clip_mean():
    image = np.full((2, 4, 3), 7, np.uint8)
    fill = tuple(round(255 * m) for m in CLIP_MEAN)
    padded = pad_to_square(image, fill)
    assert padded.shape == (4, 4, 3)
    np.testing.assert_array_equal(padded[0, 0], fill)
    np.testing.assert_array_equal(padded[1:3], image)
    assert fill == (123, 117, 104)


def test_prompt_layout_and_answer_only_labels(llava_dir):
    backbone = load_backbone("llava", str(llava_dir))
    inputs = backbone.build_inputs(["Point to the cup.", "Hi"], ["[(0.500, 0.250)]", "[(0.100, 0.900)]"])
    tok = backbone.tokenizer
    row = inputs["input_ids"][1][inputs["attention_mask"][1].bool()]
    text = tok.decode(row)
    assert tok.convert_ids_to_tokens(row[:2].tolist()) == ["<s>", "▁A"]  # <s>, then SentencePiece's leading ▁
    assert "USER: " + "<image>" * 16 + "\nHi ASSISTANT:" in text
    assert text.endswith("[(0.100, 0.900)]</s>")
    answer = inputs["labels"][1][inputs["labels"][1] != -100]
    assert tok.decode(answer).strip() == "[(0.100, 0.900)]</s>"
    assert inputs["input_ids"][0, 0] != tok.pad_token_id or inputs["attention_mask"][0, 0] == 0  # left padding


def test_wrong_family_is_refused(llava_dir):
    from affordvla.backbones.base import BackboneLoadError

    with pytest.raises(BackboneLoadError, match="is a 'llava' checkpoint, but this backbone loads 'paligemma'"):
        load_backbone("paligemma", str(llava_dir))


def test_llava_overfits_a_batch_with_the_keypoint_head(llava_dir):
    torch.manual_seed(0)
    backbone = load_backbone("llava", str(llava_dir))
    head, samples, batch = keypoint_head_and_batch(backbone)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)
    losses = overfit_keypoint_batch(backbone, head, batch, optimizer, steps=150)
    assert_learned("overfit/llava", fell_by(losses), 1 / 20, losses[::10])
    backbone.eval()
    texts, points = head.predict(backbone, batch["pixel_values"][:2], samples[:2])
    assert texts == [head.target_text(s) for s in samples[:2]]  # greedy decoding reproduces the fitted answers
    np.testing.assert_allclose(points[0], samples[0].keypoints, atol=5e-4)


def write_original_llava(out, llava_dir, projector="mlp2x_gelu", tower_in_checkpoint=False):
    """A checkpoint in the original LLaVA layout (LlavaLlamaForCausalLM), made from the tiny transformers one:
    Llama weights under model.*, model.mm_projector.{0,2}, the CLIP tower in its own directory named by
    mm_vision_tower, and a tokenizer without <image>. Returns (original dir, clip dir)."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPVisionModel,
        LlamaTokenizer,
        LlavaForConditionalGeneration,
    )

    from affordvla.offline.tokenizer_corpus import train_bpe

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    clip_dir = out / "clip"
    clip = CLIPVisionModel(model.config.vision_config)
    clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(clip_dir)
    original = out / "robopoint"
    original.mkdir(parents=True)
    text = model.config.text_config
    vocab = 800  # the tokenizer's size before <pad> and <image> were appended
    state = {f"model.{k}": v[:vocab] if k == "embed_tokens.weight" else v
             for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight[:vocab]
    proj = model.model.multi_modal_projector
    if projector == "mlp2x_gelu":
        state.update({"model.mm_projector.0.weight": proj.linear_1.weight,
                      "model.mm_projector.0.bias": proj.linear_1.bias,
                      "model.mm_projector.2.weight": proj.linear_2.weight,
                      "model.mm_projector.2.bias": proj.linear_2.bias})
    else:
        state.update({"model.mm_projector.weight": proj.linear_1.weight, "model.mm_projector.bias": proj.linear_1.bias})
    if tower_in_checkpoint:
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.state_dict().items()})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, original / "model.safetensors")
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": vocab,
              "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
              "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
              "num_key_value_heads": text.num_key_value_heads, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
              "image_aspect_ratio": "pad", "mm_hidden_size": model.config.vision_config.hidden_size,
              "mm_projector_type": projector, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
              "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": str(clip_dir)}
    (original / "config.json").write_text(json.dumps(config, indent=2))
    vocab_map, merges = train_bpe(["<unk>", "<s>", "</s>"], vocab, style="llama")  # Llama's, without <image>
    LlamaTokenizer(vocab=vocab_map, merges=merges).save_pretrained(original)
    return original, clip_dir


@pytest.mark.parametrize("projector, tower_in_checkpoint", [("mlp2x_gelu", False), ("linear", True)])
def test_original_llava_checkpoints_convert_exactly(llava_dir, tmp_path, projector, tower_in_checkpoint):
    from transformers import LlavaForConditionalGeneration

    from affordvla.backbones.llava.convert import main as convert_main

    reference = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    if projector == "linear":  # an original linear projector = linear_1 alone: make the reference one too
        with torch.no_grad():
            reference.model.multi_modal_projector.linear_2.weight.copy_(torch.eye(32))
            reference.model.multi_modal_projector.linear_2.bias.zero_()
        reference.config.projector_hidden_act = "linear"
        reference.save_pretrained(tmp_path / "reference")
        reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "reference").eval()
        llava_dir = tmp_path / "reference"
    original, _ = write_original_llava(tmp_path, llava_dir, projector, tower_in_checkpoint)
    backbone = load_backbone("llava", str(original))  # converted in memory on load
    backbone.eval()
    pixels = torch.randn(2, 3, 32, 32)

    def ids(model):  # <s>, 16 x <image>, text
        return torch.tensor([[1] + [model.config.image_token_id] * 16 + [5, 6, 7]] * 2)

    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids(reference)).logits[..., :800]
        got = backbone.model(pixel_values=pixels, input_ids=ids(backbone.model)).logits[..., :800]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert backbone.tokenizer.convert_tokens_to_ids("<image>") == backbone.model.config.image_token_id
    out = tmp_path / "converted"
    assert convert_main([str(original), str(out)]) == 0  # the command writes a plain transformers directory
    plain = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=pixels, input_ids=ids(plain)).logits[..., :800], expected,
                                   rtol=1e-5, atol=1e-5)


def test_conversion_needs_a_local_vision_tower(llava_dir, tmp_path, capsys):
    from affordvla.backbones.llava.convert import main as convert_main

    original, clip_dir = write_original_llava(tmp_path, llava_dir)
    config = json.loads((original / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (original / "config.json").write_text(json.dumps(config))
    assert convert_main([str(original), str(tmp_path / "out")]) == 1
    assert "is not a local directory; pass the local CLIP checkpoint" in capsys.readouterr().err
    assert convert_main([str(original), str(tmp_path / "out"), "--vision-tower", str(clip_dir)]) == 0
