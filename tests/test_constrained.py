"""Constrained decoding: the answer automata, their lift to both tiny tokenizers, and generation with random
tiny backbones, where unconstrained greedy text does not parse and constrained text always does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from affordvla.backbones.factory import load_backbone
from affordvla.formats.codecs import KalieJsonCodec, PaliGemmaLocCodec, RoboPointTupleCodec, make_codec
from affordvla.formats.sample import KeypointSample
from affordvla.heads.constrained import (
    CharAutomaton,
    TokenConstraint,
    codec_automaton,
    token_texts,
)
from affordvla.heads.keypoint_text import KeypointTextHead
from affordvla.offline.tiny_cogvlm import write_tiny_cogvlm
from affordvla.offline.tiny_llava import build_tokenizer as llama_tokenizer
from affordvla.offline.tiny_llava import write_tiny_llava
from affordvla.offline.tiny_paligemma import build_tokenizer as gemma_tokenizer
from affordvla.offline.tiny_paligemma import write_tiny_paligemma

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"

TWO = ("Grasp Point", "Pre-contact Point")


def _codecs():
    """Codec settings the automata must cover: grids, point counts and names."""
    return [
        PaliGemmaLocCodec(), PaliGemmaLocCodec(("p",), bins=100), PaliGemmaLocCodec(("a", "b"), bins=1),
        PaliGemmaLocCodec(("a", "b", "c"), bins=10_000),
        KalieJsonCodec(), KalieJsonCodec(TWO), KalieJsonCodec(("P1 Point",)),
        RoboPointTupleCodec(), RoboPointTupleCodec(num_points=3),
    ]


def _random_points(codec, rng) -> np.ndarray:
    k = len(codec.point_names) if codec.fixed_count else (codec.num_points or int(rng.integers(1, 51)))
    return rng.uniform(-0.1, 1.1, (k, 2))


# ---------------------------------------------------------------------------------------------- automata


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: f"{c.name}-{len(c.point_names)}")
def test_automaton_accepts_every_encoded_answer(codec):
    auto = codec_automaton(codec)
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = codec.encode(_random_points(codec, rng))
        assert auto.accepts(text) and auto.accepts(" " + text), text
        assert not auto.accepts(text[:-1]) and not auto.accepts(text + " ")
        state = 0
        for c in text:  # every prefix is live
            state = auto.edges[state].get(c)
            assert state is not None
    corners = np.array([[0.0, 0.0], [1.0, 1.0], [0.9999, 0.0005]])
    kp = np.resize(corners, (len(codec.point_names) if codec.fixed_count else codec.num_points or 3, 2))
    assert auto.accepts(codec.encode(kp))


@pytest.mark.parametrize(
    "codec, text",
    [
        (PaliGemmaLocCodec(), "<loc1024>"),  # past the last bin
        (PaliGemmaLocCodec(), "<loc2"),
        (PaliGemmaLocCodec(), "<loc103"),
        (PaliGemmaLocCodec(), "<loc10235"),
        (PaliGemmaLocCodec(), "<LOC"),
        (PaliGemmaLocCodec(), "<loc0512> "),
        (PaliGemmaLocCodec(), "<loc512>"),
        (PaliGemmaLocCodec(), "  <loc"),  # one leading space at most
        (PaliGemmaLocCodec(), "<loc0000>" * 11),  # more than 2K tokens
        (PaliGemmaLocCodec(("p",), bins=100), "<loc0100>"),
        (KalieJsonCodec(), '{"Grasp'),  # compact JSON is not the trained skeleton
        (KalieJsonCodec(), '{\n    "grasp'),
        (KalieJsonCodec(), '{\n    "Function Point'),  # names in order
        (KalieJsonCodec(), '{\n    "Grasp Point": [\n        "39"'),
        (KalieJsonCodec(), '{\n    "Grasp Point": [\n        "3a'),
        (KalieJsonCodec(), '{\n    "Grasp Point": [\n        397'),
        (KalieJsonCodec(), "{'"),
        (KalieJsonCodec(), "Sure"),
        (KalieJsonCodec(TWO), KalieJsonCodec(TWO).encode(np.zeros((2, 2)))[:-1] + ",}"),
        (RoboPointTupleCodec(), "[]"),
        (RoboPointTupleCodec(), "[(1.5"),
        (RoboPointTupleCodec(), "[(1.001"),
        (RoboPointTupleCodec(), "[(-"),
        (RoboPointTupleCodec(), "[(.5"),
        (RoboPointTupleCodec(), "[(0.5,"),  # three decimals
        (RoboPointTupleCodec(), "[(0.5000"),
        (RoboPointTupleCodec(), "[(0.500,0.500)"),
        (RoboPointTupleCodec(), "[(0.500, 0.500)]]"),
        (RoboPointTupleCodec(), "[(0.500, 0.500),]"),
        (RoboPointTupleCodec(), "[(0.500, 0.500, "),
        (RoboPointTupleCodec(), "(0.500, 0.500)"),
        (RoboPointTupleCodec(num_points=2), "[(0.500, 0.500)]"),  # too few
        (RoboPointTupleCodec(num_points=2), "[(0.500, 0.500), (0.500, 0.500), "),  # too many
    ],
)
def test_automaton_rejects_malformed_prefixes(codec, text):
    auto = codec_automaton(codec)
    assert not auto.is_prefix(text) and not auto.accepts(text)


def test_robopoint_point_count_bounds():
    one = "(0.100, 0.200)"
    auto = codec_automaton(RoboPointTupleCodec(), max_points=3)
    assert all(auto.accepts("[" + ", ".join([one] * n) + "]") for n in (1, 2, 3))
    assert not auto.is_prefix("[" + ", ".join([one] * 4))
    exact = codec_automaton(RoboPointTupleCodec(num_points=2))
    assert exact.accepts(f"[{one}, {one}]") and not exact.accepts(f"[{one}]")
    with pytest.raises(ValueError):
        codec_automaton(RoboPointTupleCodec(num_points=4), max_points=3)


def test_cyclic_automaton_is_refused():
    auto = CharAutomaton()
    auto.link(0, "a", 0)
    with pytest.raises(ValueError, match="cycle"):
        auto.topological_order()
    with pytest.raises(ValueError, match="another state"):
        auto.link(0, "a", auto.add_state())


# ---------------------------------------------------------------------------------------------- tokenizers

TOKENIZERS = {"gemma": gemma_tokenizer, "llama": llama_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def test_token_texts_read_as_decoded_mid_answer(tokenizer):
    texts = token_texts(tokenizer)
    assert len(texts) == len(tokenizer)
    for i in tokenizer.all_special_ids:
        assert texts[i] is None
    assert texts[tokenizer.convert_tokens_to_ids("<0x0A>")] == "\n"
    pieces = {tokenizer.convert_ids_to_tokens(i): t for i, t in enumerate(texts) if t is not None}
    for piece, text in pieces.items():
        if not piece.startswith("<"):  # byte tokens and added tokens are checked above and below
            assert text == piece.replace("▁", " "), piece
    assert any(p.startswith("▁") and len(p) > 1 for p in pieces)  # leading-space pieces exist and were read
    if "<loc0512>" in tokenizer.get_vocab():
        assert texts[tokenizer.convert_tokens_to_ids("<loc0512>")] == "<loc0512>"


def _run(processor, ids: list[int], vocab: int, prompt: int = 3):
    """Feed `ids` through the processor as generate would; yields each step's allowed-token mask."""
    seq = [0] * prompt
    for token in [*ids, None]:
        allowed = processor(torch.tensor([seq]), torch.zeros(1, vocab))[0] > -math.inf
        yield token, allowed
        if token is not None:
            seq.append(token)


@pytest.mark.parametrize("codec_name", ["paligemma_loc", "kalie_json", "robopoint"])
def test_trained_answers_pass_the_processor_token_by_token(tokenizer, codec_name):
    """Teacher forcing: every token of a tokenised answer is allowed, EOS only after the last one. Both forms are
    checked: the bare answer (PaliGemma's target) and `" " + answer` (LLaVA's)."""
    codec = make_codec(codec_name)
    constraint = TokenConstraint(codec_automaton(codec), tokenizer)
    rng = np.random.default_rng(1)
    vocab = len(tokenizer) + 7  # model vocabularies may be padded past the tokenizer
    for prefix in ["", " "] * 3:
        ids = tokenizer(prefix + codec.encode(_random_points(codec, rng)), add_special_tokens=False)["input_ids"]
        processor = constraint.logits_processor(max_new_tokens=len(ids) + 1)
        steps = list(_run(processor, ids, vocab))
        for token, allowed in steps[:-1]:
            assert allowed[token] and not allowed[tokenizer.eos_token_id]
            assert not allowed[len(tokenizer) :].any()
        assert steps[-1][1].nonzero().flatten().tolist() == [tokenizer.eos_token_id]


@pytest.mark.parametrize("codec", [PaliGemmaLocCodec(("a", "b")), KalieJsonCodec(TWO), RoboPointTupleCodec()],
                         ids=lambda c: c.name)
def test_random_logits_always_give_parseable_answers_within_the_budget(tokenizer, codec):
    """Greedy decoding of random logits under every budget from the shortest answer up: the text always parses
    and never runs past max_new_tokens, even where the random choices pick long tokenisations."""
    constraint = TokenConstraint(codec_automaton(codec, max_points=4), tokenizer)
    shortest = int(constraint.min_tokens[0])
    generator = torch.Generator().manual_seed(0)
    for budget in [shortest, shortest + 1, shortest + 3, 4 * shortest] * 5:
        processor = constraint.logits_processor(budget)
        seq = [0, 0]
        while len(seq) - 2 < budget:
            scores = processor(torch.tensor([seq]), torch.randn(1, len(tokenizer), generator=generator))
            seq.append(int(scores.argmax()))
            if seq[-1] == tokenizer.eos_token_id:
                break
        text = tokenizer.decode(seq[2:], skip_special_tokens=False).split(tokenizer.eos_token)[0]
        assert codec.try_decode(text) is not None, (budget, text)
    assert codec.n_failed == 0
    with pytest.raises(ValueError, match="cannot hold a complete answer"):
        constraint.logits_processor(shortest - 1)


def test_finished_and_foreign_rows_only_allow_eos(tokenizer):
    constraint = TokenConstraint(codec_automaton(PaliGemmaLocCodec(("p",), bins=4)), tokenizer)
    processor = constraint.logits_processor(max_new_tokens=30)
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    first = processor(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, vocab))
    assert torch.equal(first[0], first[1]) and not torch.isfinite(first[0, eos])
    pad = tokenizer.pad_token_id
    after = processor(torch.tensor([[0, eos], [0, pad]]), torch.zeros(2, vocab))
    for row in after:  # a row past EOS, and a row the processor would never have written
        assert (row > -math.inf).nonzero().flatten().tolist() == [eos]


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Randomly initialised tiny backbones: one per tokenizer family, and CogVLM with its own generation loop."""
    root = tmp_path_factory.mktemp("constrained")
    size = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "vision_layers": 1,
            "text_layers": 1, "heads": 2}
    out = {"paligemma": load_backbone("paligemma", str(write_tiny_paligemma(root / "paligemma", **size))),
           "llava": load_backbone("llava", str(write_tiny_llava(root / "llava", **size))),
           "cogvlm": load_backbone("cogvlm", str(write_tiny_cogvlm(root / "cogvlm", **size)))}
    for backbone in out.values():
        backbone.eval()
    return out


def _samples(n: int = 3) -> list[KeypointSample]:
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), np.zeros((32, 32, 3), np.uint8),
              np.full((32, 32, 3), 255, np.uint8)]
    return [KeypointSample(image=images[i % 3], instruction="Point at the brush and the trash.",
                           keypoints=rng.random((2, 2)), point_names=TWO) for i in range(n)]


@pytest.mark.parametrize("family", ["paligemma", "llava", "cogvlm"])
@pytest.mark.parametrize("codec", ["paligemma_loc", "kalie_json", "robopoint"])
def test_constrained_generation_always_parses(tiny_models, family, codec):
    backbone, samples = tiny_models[family], _samples()
    pixels = backbone.preprocess_images([s.image for s in samples])
    kwargs = {"codec": codec, "codec_kwargs": {"point_names": TWO}}
    free = KeypointTextHead(**kwargs)
    texts, points = free.predict(backbone, pixels, samples)
    assert points == [None] * len(samples) and free.codec.n_failed == len(samples), texts

    head = KeypointTextHead(**kwargs, constrained=True)
    texts, points = head.predict(backbone, pixels, samples)
    assert (head.codec.n_failed, head.codec.n_parsed) == (0, len(samples)), texts
    for text, kp in zip(texts, points):
        assert codec_automaton(head.codec).accepts(text)
        assert head.codec.encode(kp) == text.strip()  # the text is exactly one well-formed answer
        if codec != "robopoint":
            assert kp.shape == (2, 2)
    assert head.constraint(backbone) is head.constraint(backbone)  # built once per tokenizer


def test_head_config_decodes_constrained_and_the_class_default_is_free():
    cfg = OmegaConf.load(CONFIG_DIR / "head" / "keypoint_text.yaml")
    assert cfg.constrained is True  # the configured head: every answer parses
    assert OmegaConf.to_container(cfg)["codec"] == "${backbone.keypoint_codec}"  # the backbone's own format
    cfg.codec = "paligemma_loc"
    head = KeypointTextHead(**{k: v for k, v in cfg.items() if k != "_target_"})
    assert head.constrained is True
    assert KeypointTextHead().constrained is False  # plain generation unless asked


def test_fixed_count_data_makes_robopoint_answers_exactly_that_long():
    head = KeypointTextHead(codec="robopoint", constrained=True)
    head.match_point_count(5)  # KALIE data: five points per answer
    assert head.codec.num_points == 5
    automaton = codec_automaton(head.codec)
    assert automaton.accepts(head.codec.encode(np.full((5, 2), 0.25)))
    assert not automaton.accepts(head.codec.encode(np.full((1, 2), 0.25)))
    assert not automaton.is_prefix(head.codec.encode(np.full((6, 2), 0.25)))
    explicit = KeypointTextHead(codec="robopoint", codec_kwargs={"num_points": 2})
    explicit.match_point_count(5)  # a count the user configured stays
    assert explicit.codec.num_points == 2
    variable = KeypointTextHead(codec="robopoint")
    variable.match_point_count(None)  # RoboPoint VQA: counts vary
    assert variable.codec.num_points is None
