"""The offline tiny tokenizers' training text (every prompt the project writes, plus common English) and the
byte-fallback BPE trainer they share (SentencePiece style: '▁' marks a space, unknown bytes become <0xNN>)."""

from __future__ import annotations

import json
from typing import cast

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from affordvla.formats.kalie_tasks import TASKS, kalie_prompt

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


_COMMON = (
    "the a an of to and in on with from for is are be this that it its at by as or not what where which "
    "robot gripper image table top down camera view object point points keypoint keypoints waypoint waypoints "
    "grasp function target pre contact post move pick place push pull open close left right up down next step "
    "action actions answer question describe output format pixel coordinates each one two three four five "
    "red green blue yellow black white small large bowl cup brush trash drawer towel cloth rack scooper usb "
    "stick computer laptop items please structure your response following where x y"
)
_CHAT = (  # Vicuna v1's conversation frame (LLaVA-1.5, RoboPoint) and LLARVA's instruction data
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: ASSISTANT: You are a Franka robot using the "
    "joint control. The task is previous five (including current) steps are Can you predict action of the next "
    "1 step? The next action step: Your answer should be formatted as a list of tuples"
)


def tokenizer_corpus() -> list[str]:
    lines = [_COMMON, _CHAT]
    for task in TASKS.values():
        lines += [task.instruction, kalie_prompt(task), " ".join(task.objects)]
    lines += [str(i) for i in range(1000)]
    return lines


def train_bpe(special_tokens: list[str], vocab_size: int = 800, unk_token: str = "<unk>", style: str = "gemma"
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-fallback BPE trained on the corpus; ids start with `special_tokens`, then the
    256 byte tokens, then the learned pieces. `style` splits the text the way the target tokenizer class will:
    "gemma" (spaces become '▁' ending a piece) or "llama" (Metaspace: '▁' starts a piece, one prepended)."""
    trainer_tokenizer = Tokenizer(BPE(unk_token=unk_token, byte_fallback=True))
    if style == "llama":
        trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    elif style == "gemma":
        trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
        trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        raise ValueError(f"style must be 'gemma' or 'llama', got {style!r}")
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens + BYTE_TOKENS, show_progress=False)
    trainer_tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    state = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return state["vocab"], cast(list[tuple[str, str]], merges)  # a BPE merge is a pair
