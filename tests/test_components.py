"""Unit behaviour of the pieces the entrypoint wires together, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from affordvla.backbones.base import IGNORE_INDEX, BackboneLoadError
from affordvla.backbones.factory import load_backbone
from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone
from affordvla.backbones.paligemma.tiny import (
    LOC_TOKENS,
    SEG_TOKENS,
    build_tokenizer,
    sincos_2d,
)
from affordvla.checkpointing import load_state_dict, save_state_dict
from affordvla.data.sample import KeypointSample
from affordvla.data.sampling import StepResumableSampler
from affordvla.evaluation.keypoints import UNPARSED_L2, KeypointEvaluator
from affordvla.heads.keypoint_text import KeypointTextHead
from affordvla.optim import warmup_cosine


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir) -> PaliGemmaBackbone:
    return PaliGemmaBackbone.from_pretrained(tiny_backbone_dir)


def test_tokenizer_has_paligemma_special_tokens_in_paligemma_order():
    tok = build_tokenizer()
    ids = tok.convert_tokens_to_ids(LOC_TOKENS + SEG_TOKENS + ["<image>"])
    assert ids == list(range(ids[0], ids[0] + 1024 + 128 + 1))  # contiguous: loc, then seg, then <image>
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>"]) == [0, 1, 2, 3]
    assert tok.tokenize("<loc0042><loc1023>") == ["<loc0042>", "<loc1023>"]
    text = "Sweep the trash off the table with the brush."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.decode(tok("ünïcödé 42", add_special_tokens=False)["input_ids"]) == "ünïcödé 42"  # byte fallback


def test_sincos_2d_is_row_major_and_distinguishes_every_patch():
    table = sincos_2d(4, 16)
    assert table.shape == (16, 16)
    assert len({tuple(row.tolist()) for row in table}) == 16
    # patch (row 0, col 1) differs from (0, 0) only in the x half; (1, 0) only in the y half
    assert torch.equal(table[1, 8:], table[0, 8:]) and not torch.equal(table[1, :8], table[0, :8])
    assert torch.equal(table[4, :8], table[0, :8]) and not torch.equal(table[4, 8:], table[0, 8:])


def test_build_inputs_layout(backbone):
    tok = backbone.tokenizer
    inputs = backbone.build_inputs(["Close the drawer.", "Hang the cloth on the rack."], ["<loc0001><loc0002>", "<loc0003>"])
    ids, mask, types, labels, positions = (inputs[k] for k in
                                           ("input_ids", "attention_mask", "token_type_ids", "labels", "position_ids"))
    n_image = backbone.image_seq_length
    for row in range(2):
        real = ids[row][mask[row].bool()].tolist()
        assert real[:n_image] == [backbone.model.config.image_token_id] * n_image
        assert real[n_image] == tok.bos_token_id
        # positions count real tokens only, 1-indexed as PaliGemma's generate() computes them
        assert positions[row][mask[row].bool()].tolist() == list(range(1, len(real) + 1))
    # both answers start at the same column (prompts are left-padded)
    first_answer = [(labels[r] != IGNORE_INDEX).nonzero()[0].item() for r in range(2)]
    assert first_answer[0] == first_answer[1]
    start = first_answer[0]
    assert tok.convert_ids_to_tokens(labels[0, start : start + 3].tolist()) == ["<loc0001>", "<loc0002>", "<eos>"]
    assert labels[1, start + 2].item() == IGNORE_INDEX and mask[1, start + 2].item() == 0  # right padding
    assert types[0, :start].sum() == 0 and types[0, start : start + 3].tolist() == [1, 1, 1]


def test_soft_location_loss_by_hand(backbone):
    head = KeypointTextHead(location_sigma=1.0)
    head.bind(backbone)
    vocab = len(backbone.tokenizer)
    loc0 = backbone.tokenizer.convert_tokens_to_ids("<loc0000>")
    logits = torch.zeros(1, 2, vocab)  # uniform prediction at the one answer position
    labels = torch.tensor([[IGNORE_INDEX, loc0 + 500]])
    soft = head.loss(logits, labels)["loss"].item()
    assert soft == pytest.approx(math.log(vocab), rel=1e-5)  # any target distribution: log V under uniform
    logits[0, 0, loc0 + 500] = 10.0
    head.location_sigma = 0.0
    hard = head.loss(logits, labels)["loss"].item()
    assert hard == pytest.approx(-(10.0 - math.log(math.exp(10.0) + vocab - 1)), rel=1e-5)
    head.location_sigma = 1.0
    weights = np.exp(-0.5 * (np.arange(1024) - 500.0) ** 2)
    weights /= weights.sum()
    log_z = math.log(math.exp(10.0) + vocab - 1)
    expected = -(weights[500] * (10.0 - log_z) + (1 - weights[500]) * (0.0 - log_z))
    assert head.loss(logits, labels)["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_evaluator_by_hand():
    sample = KeypointSample(np.zeros((4, 4, 3), np.uint8), "x", np.array([[0.1, 0.1]] * 5))
    evaluator = KeypointEvaluator(mean_keypoints=np.array([[0.5, 0.1]] * 5))
    evaluator.add([sample, sample], ["a", "b"], [np.array([[0.4, 0.5]] * 5), None])
    metrics = evaluator.compute()
    assert metrics["keypoint_error"] == pytest.approx((0.5 + UNPARSED_L2) / 2)
    assert metrics["keypoint_error_parsed"] == pytest.approx(0.5)
    assert metrics["parse_failure_rate"] == 0.5
    assert metrics["mean_baseline_error"] == pytest.approx(0.4)
    # KALIE: (300^2 + 400^2) / 2 = 125000 per point for the parsed answer, 1e6 for the failure
    assert metrics["kalie_avg_mse"] == pytest.approx((125000 + 1_000_000) / 2)


def test_sampler_position_follows_the_step():
    done = {"n": 0}
    sampler = StepResumableSampler(10, 3, seed=5, batches_done=lambda: done["n"])
    epoch0, epoch1 = sampler.permutation(0)[:9], sampler.permutation(1)[:9]
    assert list(sampler) == epoch0 and len(sampler) == 9
    done["n"] = 2  # two batches consumed: the rest of epoch 0
    assert list(sampler) == epoch0[6:] and len(sampler) == 3
    done["n"] = 4  # one batch into epoch 1
    assert list(sampler) == epoch1[3:]
    assert sorted(sampler.permutation(0)) == list(range(10)) and epoch0 != epoch1


def test_tied_weights_round_trip_through_safetensors(tmp_path):
    shared = torch.randn(4, 3)
    state = {"embed.weight": shared, "head.weight": shared, "other": torch.arange(5)}
    save_state_dict(state, tmp_path / "w.safetensors")
    loaded = load_state_dict(tmp_path / "w.safetensors")
    assert list(loaded) == list(state)
    for key in state:
        assert torch.equal(loaded[key], state[key])


def test_warmup_cosine_by_hand():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=10, warmup_fraction=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_backbone_errors_name_the_problem(tmp_path, tiny_backbone_dir):
    with pytest.raises(BackboneLoadError, match="does not exist"):
        load_backbone("paligemma", str(tmp_path / "missing"))
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(BackboneLoadError, match="'llava' checkpoint"):
        load_backbone("paligemma", str(tmp_path / "llava"))
    with pytest.raises(ValueError, match="valid"):
        load_backbone("not_a_family", str(tiny_backbone_dir))


def test_save_load_round_trip_is_bit_exact(backbone, tmp_path):
    backbone.save_pretrained(tmp_path / "copy")
    again = PaliGemmaBackbone.from_pretrained(tmp_path / "copy")
    for (name, a), (_, b) in zip(backbone.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    pixels = backbone.preprocess_images([image])
    inputs = backbone.build_inputs(["Close the drawer."], ["<loc0001>"])
    with torch.no_grad():
        assert torch.equal(backbone(pixels, inputs).logits, again(pixels, inputs).logits)


def test_collator_caches_pixels_only_for_samples_that_name_their_image(backbone):
    from affordvla.module import KeypointBatchCollator

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    keypoints = np.full((5, 2), 0.5)
    collate = KeypointBatchCollator(backbone, KeypointTextHead())
    named = [KeypointSample(im, "Close the drawer.", keypoints, meta={"source": "s", "entry": f"e{i}"})
             for i, im in enumerate(images)]
    first = collate(named)["pixel_values"]
    assert len(collate._pixels) == 2
    assert torch.equal(collate(named[::-1])["pixel_values"], first.flip(0))  # served from the cache, in order
    anonymous = [KeypointSample(im, "Close the drawer.", keypoints) for im in images[::-1]]
    assert torch.equal(collate(anonymous)["pixel_values"], first.flip(0))  # no meta: preprocessed afresh
    assert len(collate._pixels) == 2
