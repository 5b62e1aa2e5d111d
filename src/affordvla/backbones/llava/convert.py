"""Original-LLaVA checkpoints (RoboPoint, LLaVA-1.5 as liuhaotian released them) -> transformers' Llava layout.

The original layout is a `LlavaLlamaForCausalLM`: Llama weights under `model.*` and `lm_head`, the projector under
`model.mm_projector.{0,2}` (mlp2x_gelu) or `model.mm_projector` (linear), and the vision tower named by
`mm_vision_tower` in config.json (weights stored separately, or under `model.vision_tower.vision_tower.*` when it
was fine-tuned). `<image>` is not in the tokenizer; the original code splices image features in at a sentinel id.

The conversion maps config and state dict onto LlavaForConditionalGeneration, adds `<image>` (and `<pad>`) to the
tokenizer with embedding rows initialised to the mean of the existing ones, and keeps `mm_vision_select_layer`,
`mm_vision_select_feature` and the projector exactly. It runs in memory when such a checkpoint is loaded, and
`affordvla-convert-llava` writes the converted directory once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from affordvla.backbones.base import BackboneLoadError
from affordvla.backbones.llava.conventions import (
    CHAT_TEMPLATE,
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
)
from affordvla.cli import console_command

ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
_NOT_LLAMA = ("architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


def is_original_llava(config: dict) -> bool:
    return "mm_vision_tower" in config or any(a in ORIGINAL_ARCHITECTURES for a in config.get("architectures") or [])


def _read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    files = sorted(src.glob("*.safetensors"))
    for file in files:
        state.update(load_file(file))
    if not files:
        for file in sorted(src.glob("pytorch_model*.bin")):
            state.update(torch.load(file, map_location="cpu", weights_only=True))  # tensors only: no code runs
    if not state:
        raise BackboneLoadError(f"{src}: no *.safetensors or pytorch_model*.bin weights")
    return state


def _projector(state: dict[str, torch.Tensor], kind: str, src: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Projector weights in transformers' names and the activation that makes them exact."""
    if kind == "linear":
        weight, bias = state["model.mm_projector.weight"], state["model.mm_projector.bias"]
        hidden = weight.shape[0]  # a linear projector = linear_1, identity activation, identity linear_2
        return {"linear_1.weight": weight, "linear_1.bias": bias,
                "linear_2.weight": torch.eye(hidden, dtype=weight.dtype),
                "linear_2.bias": torch.zeros(hidden, dtype=weight.dtype)}, "linear"
    if re.fullmatch(r"mlp2x_gelu", kind):
        return {"linear_1.weight": state["model.mm_projector.0.weight"],
                "linear_1.bias": state["model.mm_projector.0.bias"],
                "linear_2.weight": state["model.mm_projector.2.weight"],
                "linear_2.bias": state["model.mm_projector.2.bias"]}, "gelu"
    raise BackboneLoadError(f"{src}/config.json: mm_projector_type {kind!r} has no exact counterpart in transformers' "
                            "Llava (supported: linear, mlp2x_gelu)")


def _vision_tower(src: Path, config: dict, state: dict, vision_tower: str | Path | None):
    """(CLIPVisionConfig, tower state dict or None, image processor source dir or None)."""
    stored = {k.removeprefix("model.vision_tower.vision_tower."): v for k, v in state.items()
              if k.startswith("model.vision_tower.vision_tower.")}
    stored = {k.removeprefix("vision_model."): v for k, v in stored.items()}
    location = Path(vision_tower) if vision_tower else Path(str(config.get("mm_vision_tower", "")))
    if location.is_dir():
        clip = CLIPVisionModel.from_pretrained(location)
        return clip.config, stored or clip.state_dict(), location
    raise BackboneLoadError(
        f"{src}: the vision tower {config.get('mm_vision_tower')!r} is not a local directory; pass the local CLIP "
        "checkpoint (e.g. clip-vit-large-patch14-336) as vision_tower / --vision-tower (no model hub is contacted)")


def convert_original_llava(src: str | Path, vision_tower: str | Path | None = None
                           ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    src = Path(src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise BackboneLoadError(f"{src} has no config.json")
    config = json.loads(config_path.read_text())
    if not is_original_llava(config):
        raise BackboneLoadError(f"{config_path} is not an original-LLaVA (LlavaLlamaForCausalLM) checkpoint")
    state = _read_state_dict(src)
    projector, activation = _projector(state, config.get("mm_projector_type", "linear"), src)
    vision_config, tower_state, processor_dir = _vision_tower(src, config, state, vision_tower)

    tokenizer = AutoTokenizer.from_pretrained(src)
    added: dict[str, Any] = {"extra_special_tokens": [IMAGE_TOKEN]} if IMAGE_TOKEN not in tokenizer.get_vocab() else {}
    if tokenizer.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tokenizer.add_special_tokens(added)
    llama = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in _NOT_LLAMA}
    llama["vocab_size"] = len(tokenizer)  # grown by the tokens added above
    text_config = LlamaConfig(**llama)
    select = config.get("mm_vision_select_feature", "patch")
    # transformers' LlavaConfig takes image_token_id and pad_token_id through **kwargs, left out of its signature
    llava_config = LlavaConfig(  # type: ignore[call-arg]
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act=activation,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2 + (select != "patch"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlavaForConditionalGeneration(llava_config)
    language = {k.removeprefix("model."): v for k, v in state.items()
                if k.startswith("model.") and not k.startswith(("model.mm_projector", "model.vision_tower"))}
    vocab_before = language["embed_tokens.weight"].shape[0]
    model.model.language_model.load_state_dict(_grow_rows(language, "embed_tokens.weight", len(tokenizer)), strict=True)
    model.lm_head.load_state_dict(_grow_rows({"weight": state["lm_head.weight"]}, "weight", len(tokenizer)))
    model.model.multi_modal_projector.load_state_dict(projector)
    model.model.vision_tower.load_state_dict(tower_state)
    model.config.affordvla_conversion = {"source": str(src), "original_vocab_size": vocab_before,
                                         "image_aspect_ratio": config.get("image_aspect_ratio", "pad")}

    image_processor = (CLIPImageProcessorPil.from_pretrained(processor_dir)
                       if processor_dir is not None and (processor_dir / "preprocessor_config.json").is_file()
                       else CLIPImageProcessorPil(size={"shortest_edge": vision_config.image_size},
                                                  crop_size={"height": vision_config.image_size,
                                                             "width": vision_config.image_size},
                                                  image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
                               chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    return model, processor


def _grow_rows(state: dict[str, torch.Tensor], key: str, rows: int) -> dict[str, torch.Tensor]:
    """Append rows (the mean of the existing ones) for tokens the conversion added."""
    table = state[key]
    if table.shape[0] < rows:
        extra = table.float().mean(0, keepdim=True).to(table.dtype).expand(rows - table.shape[0], -1)
        state = {**state, key: torch.cat([table, extra])}
    return state


def write_converted(src: str | Path, out: str | Path, vision_tower: str | Path | None = None) -> Path:
    model, processor = convert_original_llava(src, vision_tower)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@console_command("affordvla-convert-llava")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="affordvla-convert-llava",
                                     description="Convert an original-LLaVA / RoboPoint checkpoint to transformers' "
                                                 "Llava layout (loadable by LlavaForConditionalGeneration).")
    parser.add_argument("src", help="original checkpoint directory (config.json with mm_vision_tower, weights)")
    parser.add_argument("out", help="directory to write")
    parser.add_argument("--vision-tower", help="local CLIP vision checkpoint directory named by mm_vision_tower")
    args = parser.parse_args(argv)
    try:
        print(write_converted(args.src, args.out, args.vision_tower))
    except BackboneLoadError as exc:
        print(f"affordvla-convert-llava: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
