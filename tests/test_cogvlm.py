"""The native CogVLM: official parameter names and checkpoints, routing to the visual experts, shared image
positions, the embedding-level interface, greedy generation with its cache, and learning on one batch."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_learned, fell_by, keypoint_head_and_batch, overfit_keypoint_batch
from PIL import Image
from safetensors.torch import load_file, save_file

from affordvla.backbones.base import BackboneLoadError
from affordvla.backbones.cogvlm.configuration import (
    cogvlm_base490_config,
    cogvlm_chat_config,
)
from affordvla.backbones.cogvlm.modeling import build_position_ids, vision_expert_mask
from affordvla.backbones.cogvlm.processing import CLIP_MEAN, CLIP_STD
from affordvla.backbones.factory import load_backbone
from affordvla.offline.tiny_cogvlm import write_tiny_cogvlm

PATCHES = 16  # (32 / 8)^2
IMAGE_RUN = PATCHES + 2  # boi, patches, eoi
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cogvlm_dir(tmp_path_factory):
    return write_tiny_cogvlm(tmp_path_factory.mktemp("cogvlm") / "tiny", image_size=32, patch_size=8, hidden_size=32,
                             vision_layers=2, text_layers=2, intermediate_size=64)


@pytest.fixture
def backbone(cogvlm_dir):
    return load_backbone("cogvlm", str(cogvlm_dir))


def official_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official CogVLM checkpoint (THUDM/cogvlm-chat-hf) and its shape, from the reference
    list (shared/reference/cogvlm.md), for the sizes in `config` (a config.json dict)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    vision = config["vision_config"]
    width, vision_inter, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes[layer + "self_attn.rotary_emb.inv_freq"] = (hidden // config["num_attention_heads"] // 2,)
        for expert in ("vision", "language"):
            shapes[layer + f"self_attn.{expert}_expert_query_key_value.weight"] = (3 * hidden, hidden)
            shapes[layer + f"self_attn.{expert}_expert_dense.weight"] = (hidden, hidden)
            shapes[layer + f"mlp.{expert}_mlp.gate_proj.weight"] = (inter, hidden)
            shapes[layer + f"mlp.{expert}_mlp.up_proj.weight"] = (inter, hidden)
            shapes[layer + f"mlp.{expert}_mlp.down_proj.weight"] = (hidden, inter)
        shapes[layer + "input_layernorm.weight"] = (hidden,)
        shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
    shapes |= {"model.vision.boi": (1, 1, hidden), "model.vision.eoi": (1, 1, hidden),
               "model.vision.patch_embedding.cls_embedding": (1, width),
               "model.vision.patch_embedding.proj.weight": (width, vision["in_channels"], patch, patch),
               "model.vision.patch_embedding.proj.bias": (width,),
               "model.vision.patch_embedding.position_embedding.weight": (vision["num_positions"], width)}
    for j in range(vision["num_hidden_layers"]):
        layer = f"model.vision.transformer.layers.{j}."
        for name, out_features, in_features in [("attention.query_key_value", 3 * width, width),
                                                ("attention.dense", width, width), ("mlp.fc1", vision_inter, width),
                                                ("mlp.fc2", width, vision_inter)]:
            shapes[layer + name + ".weight"] = (out_features, in_features)
            shapes[layer + name + ".bias"] = (out_features,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[layer + norm + ".weight"] = (width,)
            shapes[layer + norm + ".bias"] = (width,)
    shapes |= {"model.vision.linear_proj.linear_proj.weight": (hidden, width),
               "model.vision.linear_proj.norm1.weight": (hidden,), "model.vision.linear_proj.norm1.bias": (hidden,),
               "model.vision.linear_proj.dense_h_to_4h.weight": (inter, hidden),
               "model.vision.linear_proj.gate_proj.weight": (inter, hidden),
               "model.vision.linear_proj.dense_4h_to_h.weight": (hidden, inter)}
    return shapes


def test_parameter_names_and_shapes_are_the_official_ones(backbone, cogvlm_dir):
    config = json.loads((cogvlm_dir / "config.json").read_text())
    expected = official_shapes(config)
    got = {name: tuple(t.shape) for name, t in backbone.model.state_dict().items()}
    assert got == expected
    assert set(load_file(cogvlm_dir / "model.safetensors")) == set(expected)
    # the full-size presets give the published sizes: 1225 patches -> 1227 image positions at 490 px
    for preset, template in [(cogvlm_chat_config(), "chat"), (cogvlm_base490_config(), "base")]:
        assert preset.vision_token_count == 1227 and preset.vision_config["num_positions"] == 1226
        assert preset.template_version == template
    full = official_shapes(cogvlm_chat_config().to_dict())
    assert full["model.layers.31.self_attn.vision_expert_query_key_value.weight"] == (12288, 4096)
    assert full["model.vision.transformer.layers.62.mlp.fc1.weight"] == (15360, 1792)


def test_parts_cover_every_parameter_once(backbone):
    for name, _ in backbone.model.named_parameters():
        owners = [part for part, prefixes in backbone.part_prefixes.items() if name.startswith(prefixes)]
        assert len(owners) == 1, (name, owners)
    parts = backbone.parameter_parts()
    assert all(parts[p] for p in ("vision_tower", "projector", "language_model"))


def write_official_checkpoint(out, config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A directory laid out like THUDM/cogvlm-chat-hf: its config.json (no model_type, remote-code auto_map),
    bf16 tensors in two safetensors shards with an index, and no tokenizer. Returns the tensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16)
               for name, shape in official_shapes(config).items()}
    out.mkdir(parents=True)
    official = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "dtype")}
    official |= {"auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                              "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"},
                 "torch_dtype": "bfloat16", "transformers_version": "4.35.0"}
    (out / "config.json").write_text(json.dumps(official, indent=2))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, out / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard_names, shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return tensors


def test_an_official_layout_checkpoint_loads_exactly(cogvlm_dir, tmp_path):
    config = json.loads((cogvlm_dir / "config.json").read_text())
    official = tmp_path / "cogvlm-chat-hf"
    tensors = write_official_checkpoint(official, config)
    with pytest.raises(BackboneLoadError, match="has no tokenizer files.*vicuna-7b-v1.5"):
        load_backbone("cogvlm", str(official))
    vicuna = tmp_path / "vicuna"
    vicuna.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(cogvlm_dir / name, vicuna / name)
    backbone = load_backbone("cogvlm", str(official), tokenizer=str(vicuna), dtype="bfloat16")
    state = backbone.model.state_dict()
    assert set(state) == set(tensors)  # nothing missing, nothing unexpected (either would have raised)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    assert backbone.template_version == "chat" and backbone.image_seq_length == IMAGE_RUN
    # the export names no remote code, and loads again through the same path
    backbone.save_pretrained(tmp_path / "export")
    assert "auto_map" not in json.loads((tmp_path / "export" / "config.json").read_text())
    assert load_backbone("cogvlm", str(tmp_path / "export")).model.config.vocab_size == config["vocab_size"]


def test_bad_checkpoints_get_errors_that_name_the_file(cogvlm_dir, tmp_path):
    wrong = tmp_path / "llava"
    shutil.copytree(cogvlm_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"model_type": "llava"}))
    with pytest.raises(BackboneLoadError, match="llava/config.json is a 'llava' checkpoint, but this backbone loads"):
        load_backbone("cogvlm", str(wrong))
    cogvlm2 = tmp_path / "cogvlm2"
    shutil.copytree(cogvlm_dir, cogvlm2)
    (cogvlm2 / "config.json").write_text(json.dumps(config | {"num_multi_query_heads": 2}))
    with pytest.raises(BackboneLoadError, match="CogVLM2"):
        load_backbone("cogvlm", str(cogvlm2))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(cogvlm_dir, incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    del tensors["model.layers.1.mlp.vision_mlp.up_proj.weight"]
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneLoadError, match=r"incomplete/model.safetensors .*missing keys: 1 "
                                                r"\(model.layers.1.mlp.vision_mlp.up_proj.weight\)"):
        load_backbone("cogvlm", str(incomplete))
    tensors["model.layers.1.mlp.vision_mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneLoadError, match=r"mismatched keys: 1 \(model.layers.1.mlp.vision_mlp.up_proj.weight "
                                                r"is \(3, 3\) in the file, \(64, 32\) in the model\)"):
        load_backbone("cogvlm", str(incomplete))
    (incomplete / "model.safetensors").unlink()
    with pytest.raises(BackboneLoadError, match="has no model.safetensors"):
        load_backbone("cogvlm", str(incomplete))


def test_prompt_layout_token_types_and_labels(backbone):
    tok = backbone.tokenizer
    inputs = backbone.build_inputs(["Point to the cup.", "Hi"], ["[(0.500, 0.250)]", "[(0.100, 0.900)]"])
    for row in range(2):
        attended = inputs["attention_mask"][row].bool()
        ids, types = inputs["input_ids"][row][attended], inputs["token_type_ids"][row][attended]
        assert ids[0] == tok.bos_token_id and types[0] == 0
        assert types[1 : 1 + IMAGE_RUN].eq(1).all() and types[1 + IMAGE_RUN :].eq(0).all()
        assert ids[1 : 1 + IMAGE_RUN].eq(tok.pad_token_id).all() and tok.pad_token_id == 0  # CogVLM's placeholders
    text = tok.decode(inputs["input_ids"][1][1 + IMAGE_RUN + 3 :])  # row 1 has 3 columns of left padding
    assert text == "Question: Hi Answer: [(0.100, 0.900)]</s>"
    answer = inputs["labels"][1][inputs["labels"][1] != -100]
    assert tok.decode(answer).strip() == "[(0.100, 0.900)]</s>"
    assert inputs["attention_mask"][1, 0] == 0 and inputs["attention_mask"][0, 0] == 1  # left padding
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "Question: Hi Answer:"


def test_base_template_uses_the_raw_prompt(cogvlm_dir):
    base = load_backbone("cogvlm", str(cogvlm_dir), template_version="base")
    ids = base.build_inputs(["Hi there"])["input_ids"][0]
    assert base.tokenizer.decode(ids[1 + IMAGE_RUN :]) == "Hi there"


def test_image_tokens_share_one_rotary_position(backbone):
    inputs = backbone.build_inputs(["Point to the cup.", "Hi"])
    text = inputs["attention_mask"][0].sum().item() - 1 - IMAGE_RUN
    # BOS 0, boi 1, all patches 2, eoi 3, then one position per text token
    expected = [0, 1] + [2] * PATCHES + [3] + list(range(4, 4 + text))
    assert inputs["position_ids"][0].tolist() == expected
    padding = int((inputs["attention_mask"][1] == 0).sum())  # padding does not advance: the BOS gets 1
    assert inputs["position_ids"][1, : padding + 3].tolist() == [0] * padding + [1, 2, 3]
    assert inputs["position_ids"][1, padding + 2 : padding + 2 + PATCHES].eq(3).all()
    # what the model computes itself without position_ids is the same
    assert torch.equal(build_position_ids(inputs["token_type_ids"], inputs["attention_mask"]), inputs["position_ids"])
    # vision experts: boi and the patches; eoi goes to the language experts
    routed = vision_expert_mask(inputs["token_type_ids"])[0]
    assert routed.tolist() == [False] + [True] * (PATCHES + 1) + [False] * (len(routed) - PATCHES - 2)


def _layer_input(backbone):
    inputs = backbone.build_inputs(["Point to the cup.", "Hi"])
    torch.manual_seed(0)
    embeds = backbone.embed_inputs(torch.randn(2, 3, 32, 32), inputs)
    return inputs, embeds


@pytest.mark.parametrize("module, rows, routed_to", [
    ("mlp.vision_mlp.down_proj", None, "vision"),
    ("mlp.language_mlp.gate_proj", None, "language"),
    ("self_attn.vision_expert_dense", None, "vision"),
    ("self_attn.language_expert_dense", None, "language"),
    # query rows only: a query changes its own output alone (keys and values would reach every later token)
    ("self_attn.vision_expert_query_key_value", slice(0, 32), "vision"),
    ("self_attn.language_expert_query_key_value", slice(0, 32), "language"),
])
def test_each_expert_acts_only_on_its_positions(backbone, module, rows, routed_to):
    from affordvla.backbones.cogvlm.modeling import ExpertRouting, causal_attention_mask

    inputs, embeds = _layer_input(backbone)
    layer = backbone.model.model.layers[0]
    routing = ExpertRouting.from_token_types(inputs["token_type_ids"])
    mask = causal_attention_mask(inputs["attention_mask"], embeds.shape[1])

    def run():
        with torch.no_grad():
            return layer(embeds, routing, inputs["position_ids"], mask)[0]

    before = run()
    weight = layer.get_submodule(module).weight
    with torch.no_grad():
        weight[rows if rows is not None else slice(None)] += 0.5
    changed = (run() - before).abs().amax(-1) > 1e-6
    vision = vision_expert_mask(inputs["token_type_ids"])
    expected = vision if routed_to == "vision" else ~vision
    attended = inputs["attention_mask"].bool()
    if rows is not None:  # the BOS attends to itself alone: whatever its query, its attention output is the same
        expected = expected & (attended.cumsum(1) > 1)
    assert torch.equal(changed[attended], expected[attended])
    assert not changed[~attended].any()  # padding embeds to zeros, which no expert changes


def test_embedding_level_path_reproduces_forward(backbone):
    backbone.eval()
    inputs = backbone.build_inputs(["Point to the cup.", "Hi"], ["[(0.500, 0.250)]", "[(0.1, 0.9)]"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(pixels, inputs).logits
        embeds = backbone.embed_inputs(pixels, inputs)
        logits = backbone.lm_logits(backbone.hidden_states(embeds, inputs))
        assert torch.equal(logits, expected)
        assert torch.equal(backbone(pixels, inputs, logits_to_keep=5).logits, expected[:, -5:])
        # learnable tokens appended after the prompt: language-typed, positions continuing, prompt unchanged
        prompt = backbone.build_inputs(["Point to the cup.", "Hi"])
        longer = backbone.append_positions(prompt, 3)
        assert longer["token_type_ids"][:, -3:].eq(0).all()
        assert torch.equal(longer["position_ids"][:, -3:], prompt["position_ids"][:, -1:] + torch.arange(1, 4))
        queries = torch.randn(2, 3, backbone.hidden_size)
        hidden = backbone.hidden_states(torch.cat([backbone.embed_inputs(pixels, prompt), queries], dim=1), longer)
        prompt_logits = backbone(pixels, prompt).logits
    torch.testing.assert_close(backbone.lm_logits(hidden[:, :-3]), prompt_logits, rtol=1e-5, atol=1e-6)


def _greedy_by_full_forwards(backbone, pixels, prompts, steps):
    """The reference: one full forward per new token (no cache), positions recomputed from the token types."""
    inputs = backbone.build_inputs(prompts)
    ids, types, mask = inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"]
    tokens = []
    for _ in range(steps):
        step = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
                "position_ids": build_position_ids(types, mask)}
        with torch.no_grad():
            token = backbone(pixels, step).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        ids, types = torch.cat([ids, token], 1), torch.cat([types, torch.zeros_like(token)], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
    texts = []
    eos = backbone.tokenizer.eos_token_id
    for row in torch.cat(tokens, 1).tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(backbone.tokenizer.decode(row).strip())
    return texts


def test_greedy_generate_equals_repeated_argmax(backbone):
    backbone.eval()
    torch.manual_seed(3)
    with torch.no_grad():  # far from the small initialisation, so the answers depend on the image and prompt
        for param in backbone.model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    pixels = torch.randn(2, 3, 32, 32)
    prompts = ["Point to the cup.", "Hi"]
    generated = backbone.generate(pixels, prompts, max_new_tokens=6)
    assert generated == _greedy_by_full_forwards(backbone, pixels, prompts, 6)
    assert generated[0] != generated[1] and all(generated)
    # padding does not change a row's answer (rotary positions are relative)
    assert backbone.generate(pixels[1:], prompts[1:], max_new_tokens=6) == generated[1:]


def test_preprocessing_is_the_original_bicubic_resize_and_clip_normalisation(backbone):
    image = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    pixels = backbone.preprocess_images([image])
    resized = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = torch.from_numpy((resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).permute(2, 0, 1).float()
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=1e-5)


def test_save_and_load_round_trip_gives_identical_logits(backbone, tmp_path):
    backbone.eval()
    with torch.no_grad():
        for param in backbone.model.parameters():  # moved off the initialisation, so loading must read it all
            param.add_(torch.randn_like(param) * 0.01)
    inputs = backbone.build_inputs(["Point to the cup."], ["[(0.5, 0.5)]"])
    pixels = torch.randn(1, 3, 32, 32)
    backbone.save_pretrained(tmp_path / "saved")
    loaded = load_backbone("cogvlm", str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded(pixels, inputs).logits, backbone(pixels, inputs).logits)
    assert loaded.tokenizer.get_vocab() == backbone.tokenizer.get_vocab()


def test_cogvlm_overfits_a_batch_with_the_keypoint_head(backbone):
    torch.manual_seed(0)
    head, samples, batch = keypoint_head_and_batch(backbone)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3)
    backbone.train()
    losses = overfit_keypoint_batch(backbone, head, batch, optimizer, steps=120)
    assert_learned("overfit/cogvlm", fell_by(losses), 1 / 20, losses[::10])
    backbone.eval()
    texts, points = head.predict(backbone, batch["pixel_values"][:2], samples[:2])
    assert texts == [head.target_text(s) for s in samples[:2]]  # greedy decoding reproduces the fitted answers
    np.testing.assert_allclose(points[0], samples[0].keypoints, atol=5e-4)
