"""Unit behaviour of the pieces the entrypoint wires together, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from affordvla.backbones.base import IGNORE_INDEX, BackboneLoadError
from affordvla.backbones.factory import load_backbone
from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone
from affordvla.checkpointing import load_state_dict, save_state_dict
from affordvla.data.sampling import StepResumableSampler
from affordvla.formats.sample import KeypointSample
from affordvla.heads.keypoint_text import KeypointTextHead
from affordvla.metrics.keypoints import UNPARSED_L2, KeypointEvaluator
from affordvla.offline.tiny_llava import write_tiny_llava
from affordvla.offline.tiny_paligemma import (
    LOC_TOKENS,
    SEG_TOKENS,
    build_tokenizer,
    sincos_2d,
)
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
    inputs = backbone.build_inputs(["Close the drawer.", "Hang the cloth on the rack."],
                                   ["<loc0001><loc0002>", "<loc0003>"])
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
    # float32 log-softmax over the vocabulary: a few ulps of the logsumexp (about 10), so an absolute tolerance
    assert hard == pytest.approx(-(10.0 - math.log(math.exp(10.0) + vocab - 1)), abs=1e-5)
    head.location_sigma = 1.0
    weights = np.exp(-0.5 * (np.arange(1024) - 500.0) ** 2)
    weights /= weights.sum()
    log_z = math.log(math.exp(10.0) + vocab - 1)
    expected = -(weights[500] * (10.0 - log_z) + (1 - weights[500]) * (0.0 - log_z))
    assert head.loss(logits, labels)["loss"].item() == pytest.approx(expected, abs=1e-5)


def test_soft_bin_loss_by_hand():
    """The shared Gaussian over a contiguous id range (location tokens, action bins): a target inside the range is
    charged against the Gaussian's weights over the range's log-probabilities; a target outside keeps its one-hot
    loss."""
    from affordvla.heads.soft_targets import soft_bin_nll

    log_probs = torch.log_softmax(torch.arange(16.0).reshape(2, 8) % 5, -1)  # two positions, a vocabulary of 8
    targets = torch.tensor([4, 0])  # the range is ids 2..6; id 4 is its middle bin, id 0 lies outside
    one_hot = -log_probs.gather(1, targets[:, None]).squeeze(1)
    before = one_hot.clone()
    soft = soft_bin_nll(log_probs, targets, one_hot, first=2, count=5, sigma=1.0)
    weights = np.exp([-2.0, -0.5, 0.0, -0.5, -2.0])
    weights /= weights.sum()
    assert soft[0].item() == pytest.approx(-(weights * log_probs[0, 2:7].numpy()).sum(), rel=1e-6)
    assert soft[1].item() == one_hot[1].item()
    assert torch.equal(one_hot, before)  # the caller's losses are left as they were
    assert torch.equal(soft_bin_nll(log_probs, torch.tensor([0, 7]), one_hot, 2, 5, 1.0), one_hot)


@pytest.fixture(scope="module")
def llava_backbone(tmp_path_factory):
    directory = write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny", image_size=32, patch_size=8,
                                 hidden_size=32, intermediate_size=64, vision_layers=1, text_layers=1, heads=2)
    return load_backbone("llava", str(directory))


def _gaussian_mass(low: float, high: float, centre: float, sigma: float) -> float:
    """Mass of N(centre, sigma) on the whole numbers low..high-1, each standing for [n - 0.5, n + 0.5)."""
    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf((x - centre) / (sigma * math.sqrt(2))))

    return cdf(high - 0.5) - cdf(low - 0.5)


def test_soft_digit_targets_by_hand(llava_backbone):
    """RoboPoint's "0.498": the "0" stays one-hot (sigma is 0.008 of a unit there); the fraction's digits share
    a Gaussian of sigma 8/1024 of the image = 7.8125 thousandths between the numbers each digit leads to."""
    tok = llava_backbone.tokenizer
    head = KeypointTextHead(codec="robopoint", location_sigma=8.0)
    head.bind(llava_backbone)
    ids = tok("[(0.531, 0.498)]", add_special_tokens=False)["input_ids"]
    labels = torch.tensor([[IGNORE_INDEX] * 3 + ids + [IGNORE_INDEX]])
    index, targets = head.digit_targets(labels)
    assert [tok.convert_ids_to_tokens(ids[i]) for i in index] == list("05310498")
    sigma = 8 / 1024 * 1000
    assert targets[4].tolist() == [1.0] + [0.0] * 9  # the "0" of 0.498
    hundreds = [_gaussian_mass(100 * d, 100 * d + 100, 498, sigma) for d in range(10)]
    assert targets[5].tolist() == pytest.approx([m / sum(hundreds) for m in hundreds], abs=1e-6)
    assert targets[5, 4:6].tolist() == pytest.approx([0.576, 0.424], abs=1e-3)  # 498 is 1.5 from the "5"s
    tens = [_gaussian_mass(400 + 10 * d, 410 + 10 * d, 498, sigma) for d in range(10)]  # after the true "4"
    assert targets[6].tolist() == pytest.approx([m / sum(tens) for m in tens], abs=1e-6)
    units = [_gaussian_mass(490 + d, 491 + d, 498, sigma) for d in range(10)]  # after the true "49"
    assert targets[7].tolist() == pytest.approx([m / sum(units) for m in units], abs=1e-6)

    # KALIE's zero-padded "498" on the 0-999 scale: the same targets as RoboPoint's fraction
    kalie = KeypointTextHead(codec="kalie_json", location_sigma=8.0)
    kalie.bind(llava_backbone)
    kalie_ids = tok(kalie.codec.encode(np.array([[0.498, 0.531]] * 5)), add_special_tokens=False)["input_ids"]
    kalie_index, kalie_targets = kalie.digit_targets(torch.tensor([kalie_ids]))
    assert len(kalie_index) == 30
    assert torch.allclose(kalie_targets[:3], targets[5:8], atol=1e-6)

    # the loss: the soft target's cross-entropy at digit positions, the plain one elsewhere
    logits = torch.zeros(1, labels.shape[1], len(tok))
    nine = tok.convert_tokens_to_ids("9")
    logits[0, :, nine] = 5.0
    log_z = math.log(math.exp(5.0) + len(tok) - 1)
    answer = labels[0, 1:][labels[0, 1:] != IGNORE_INDEX].tolist()
    expected = []
    for position, token in enumerate(answer):
        if position in index:
            weights = targets[index.index(position)]
            expected.append(-(weights[9].item() * (5.0 - log_z) + (1 - weights[9].item()) * -log_z))
        else:
            expected.append(-((5.0 if token == nine else 0.0) - log_z))
    assert head.loss(logits, labels)["loss"].item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_digit_targets_need_a_digit_codec_and_a_tokenizer_that_splits_numbers(backbone, llava_backbone):
    loc = KeypointTextHead(codec="paligemma_loc", location_sigma=8.0)
    loc.bind(llava_backbone)
    assert loc._digit_ids is None
    merged = KeypointTextHead(codec="robopoint", location_sigma=8.0)
    merged.bind(backbone)  # the tiny PaliGemma's tokenizer has "31" as one token: no digit targets there
    assert backbone.tokenizer.tokenize("0.531")[-1] != "1" and merged._digit_ids is None


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
    assert metrics["kalie_corrected/avg_mse"] == pytest.approx((125000 + 1_000_000) / 2)


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
    from affordvla.policies.keypoints import KeypointBatchCollator

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
