"""The tiny LLaVA-1.5: a real checkpoint directory, Vicuna v1 prompts, CLIP-mean square padding, training."""

import numpy as np
import pytest
import torch

from affordvla.backbones.factory import load_backbone
from affordvla.backbones.llava.modeling import pad_to_square
from affordvla.backbones.llava.tiny import CLIP_MEAN, write_tiny_llava


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
    from affordvla.data.kalie_tasks import TASKS
    from affordvla.data.sample import KeypointSample
    from affordvla.data.tabletop import make_scenes
    from affordvla.heads.keypoint_text import KeypointTextHead
    from affordvla.module import KeypointBatchCollator

    torch.manual_seed(0)
    backbone = load_backbone("llava", str(llava_dir))
    head = KeypointTextHead(codec="robopoint")
    head.bind(backbone)
    samples = [KeypointSample(image=s.image, instruction=TASKS[s.task].instruction, keypoints=s.keypoints,
                              task=s.task) for s in make_scenes(5, 4, 32)]
    batch = KeypointBatchCollator(backbone, head)(samples)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = backbone.forward(batch["pixel_values"], batch["inputs"])
        loss = head.loss(out.logits, batch["inputs"]["labels"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, losses[::10]
    backbone.eval()
    texts, points = head.predict(backbone, batch["pixel_values"][:2], samples[:2])
    assert texts == [head.target_text(s) for s in samples[:2]]  # greedy decoding reproduces the fitted answers
    np.testing.assert_allclose(points[0], samples[0].keypoints, atol=5e-4)
