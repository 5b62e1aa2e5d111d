"""Constrained decoding: generation that can only write a well-formed answer of a keypoint codec.

Each codec's answer language is a small deterministic character automaton (`codec_automaton`):

- KALIE JSON: exactly the indent-4 skeleton `encode` writes, with the codec's point names and a digit at each of
  the 3-digit slots;
- RoboPoint: `[(d.ddd, d.ddd), ...]` with every number in [0, 1] and 1..`max_points` tuples;
- PaliGemma: exactly 2K `<locNNNN>` with NNNN < bins.

Every language allows one leading space: LLaVA is trained on `" " + answer`, and the parsers ignore it.

`TokenConstraint` lifts the automaton to a tokenizer's vocabulary once: it decodes every token after a fixed
anchor token (so SentencePiece '▁' markers and byte tokens read as the text `batch_decode` writes mid-answer),
puts the texts in a character trie, and for every automaton state walks the trie and the automaton together to
list the tokens that keep the text a valid prefix, whatever grammar pieces a token spans. It also knows the
fewest tokens that complete the answer from each state, so a finite `max_new_tokens` never cuts an answer off:
a token is allowed only if the answer can still be finished within the tokens left. `logits_processor` returns
the transformers `LogitsProcessor` that masks everything else, and allows EOS only once the answer is complete.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from affordvla.formats.codecs import KalieJsonCodec, KeypointCodec, PaliGemmaLocCodec, RoboPointTupleCodec

DIGITS = "0123456789"
ROBOPOINT_MAX_POINTS = 50  # RoboPoint answers carry 1 to 50 points


class CharAutomaton:
    """A deterministic automaton over characters; state 0 is the start. It must be acyclic (checked by
    `topological_order`), so every answer it accepts is finite and every walk ends."""

    def __init__(self) -> None:
        self.edges: list[dict[str, int]] = [{}]
        self.accepting: set[int] = set()

    def add_state(self) -> int:
        self.edges.append({})
        return len(self.edges) - 1

    def link(self, src: int, chars: str, dst: int) -> None:
        for c in chars:
            if self.edges[src].get(c, dst) != dst:
                raise ValueError(f"state {src} already leaves on {c!r} to another state")
            self.edges[src][c] = dst

    def literal(self, src: int, text: str) -> int:
        for c in text:
            nxt = self.add_state()
            self.link(src, c, nxt)
            src = nxt
        return src

    def one_of(self, src: int, chars: str) -> int:
        nxt = self.add_state()
        self.link(src, chars, nxt)
        return nxt

    def bounded_digits(self, src: int, bound: str) -> int:
        """Zero-padded numbers from 0 to `bound` written with len(bound) digits: a 'tight' path follows the
        bound's digits, and the first digit below the bound's switches to a 'loose' path taking any digit."""
        tight, loose = src, None
        for i, b in enumerate(bound):
            last = i == len(bound) - 1
            next_tight = self.add_state()
            next_loose = next_tight if last else self.add_state()
            self.link(tight, b, next_tight)
            self.link(tight, DIGITS[: int(b)], next_loose)
            if loose is not None:
                self.link(loose, DIGITS, next_loose)
            tight, loose = next_tight, next_loose
        return tight

    def walk(self, state: int | None, text: str) -> int | None:
        """The state after reading `text` from `state`, or None where `text` leaves the language."""
        for c in text:
            if state is None:
                return None
            state = self.edges[state].get(c)
        return state

    def is_prefix(self, text: str) -> bool:
        return self.walk(0, text) is not None

    def accepts(self, text: str) -> bool:
        return self.walk(0, text) in self.accepting

    def topological_order(self) -> list[int]:
        indegree = [0] * len(self.edges)
        for edges in self.edges:
            for dst in set(edges.values()):
                indegree[dst] += 1
        order, ready = [], [s for s, d in enumerate(indegree) if d == 0]
        while ready:
            state = ready.pop()
            order.append(state)
            for dst in set(self.edges[state].values()):
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
        if len(order) != len(self.edges):
            raise ValueError("the answer automaton has a cycle: answers would be unbounded")
        return order

    def allow_leading_space(self) -> None:
        """Also accept the language with one space in front (the answer's first character is never a space)."""
        first = self.add_state()
        self.edges[first] = dict(self.edges[0])
        self.link(0, " ", first)


def codec_automaton(codec: KeypointCodec, max_points: int | None = None) -> CharAutomaton:
    """The automaton of `codec`'s well-formed answers. `max_points` bounds RoboPoint's answers (default: the
    codec's `num_points` if set, else 50); with `num_points` set the answer has exactly that many points."""
    auto = CharAutomaton()
    if isinstance(codec, PaliGemmaLocCodec):
        state = 0
        for _ in range(2 * len(codec.point_names)):
            state = auto.literal(auto.bounded_digits(auto.literal(state, "<loc"), f"{codec.bins - 1:04d}"), ">")
        auto.accepting.add(state)
    elif isinstance(codec, KalieJsonCodec):
        # The skeleton comes from encode itself: the characters where an all-0 and an all-0.999 answer differ
        # are the digit slots, everything else is fixed text (names, quotes, indentation).
        zeros = codec.encode(np.zeros((len(codec.point_names), 2)))
        nines = codec.encode(np.full((len(codec.point_names), 2), 0.999))
        if len(zeros) != len(nines):
            raise ValueError("KALIE answers must have fixed-width coordinates")
        state = 0
        for a, b in zip(zeros, nines):
            state = auto.one_of(state, DIGITS if a != b else a)
        auto.accepting.add(state)
    elif isinstance(codec, RoboPointTupleCodec):
        low = codec.num_points or 1
        high = max_points or codec.num_points or ROBOPOINT_MAX_POINTS
        if not 1 <= low <= high:
            raise ValueError(f"RoboPoint answers need 1 <= num_points <= max_points, got {low} and {high}")
        end = auto.add_state()
        auto.accepting.add(end)
        state = auto.literal(0, "[")
        for i in range(high):
            state = auto.literal(state, "(")
            state = auto.literal(_unit_number(auto, state), ", ")
            state = auto.literal(_unit_number(auto, state), ")")
            if i + 1 >= low:
                auto.link(state, "]", end)
            if i + 1 < high:
                state = auto.literal(state, ", ")
    else:
        raise TypeError(f"no answer automaton for codec {type(codec).__name__}")
    auto.allow_leading_space()
    auto.topological_order()  # raises on a cycle
    return auto


def _unit_number(auto: CharAutomaton, src: int) -> int:
    """`0.ddd` or `1.000`: three decimals in [0, 1], as RoboPoint's encode writes them."""
    end = auto.add_state()
    below_one = auto.literal(auto.one_of(src, "0"), ".")
    auto.link(auto.one_of(auto.one_of(below_one, DIGITS), DIGITS), DIGITS, end)
    auto.link(auto.literal(src, "1.00"), "0", end)
    return end


def token_texts(tokenizer) -> list[str | None]:
    """Each token's text as `batch_decode(..., skip_special_tokens=False)` writes it after other text, or None
    for a token that can never be part of an answer (special tokens, empty text, part of a UTF-8 character).

    Decoding a token after an anchor shows what it adds mid-sequence: a SentencePiece '▁' becomes the space it
    stands for (a decoder strips it only at the very start), byte tokens become their character."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    base = tokenizer.decode(anchor, skip_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    decoded = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], skip_special_tokens=False)
    out: list[str | None] = []
    for i, text in enumerate(decoded):
        piece = text[len(base) :] if text.startswith(base) else ""
        out.append(piece if piece and i not in special and "\ufffd" not in piece else None)
    return out


class TokenConstraint:
    """A codec automaton lifted to one tokenizer's vocabulary (built once; `logits_processor` per generate)."""

    _END = ""  # trie key holding the ids of the tokens that end at a node (no character is empty)

    def __init__(self, automaton: CharAutomaton, tokenizer) -> None:
        self.automaton = automaton
        self.texts = token_texts(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        trie: dict = {}
        for token_id, text in enumerate(self.texts):
            if text is None:
                continue
            node = trie
            for c in text:
                node = node.setdefault(c, {})
            node.setdefault(self._END, []).append(token_id)
        # Per state: the allowed tokens sorted by the fewest tokens that finish the answer after them, so the
        # tokens that fit a budget are a prefix of the list.
        self.min_tokens: list[float] = [math.inf] * len(automaton.edges)
        self._ids: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(automaton.edges)
        self._next: list[dict[int, int]] = [{} for _ in automaton.edges]
        self._costs: list[list[float]] = [[] for _ in automaton.edges]
        for state in reversed(automaton.topological_order()):
            moves = self._moves(trie, state)
            self._next[state] = dict(moves)
            ranked = sorted(moves, key=lambda m: (self.min_tokens[m[1]], m[0]))
            self._ids[state] = torch.tensor([t for t, _ in ranked], dtype=torch.long)
            self._costs[state] = [self.min_tokens[n] for _, n in ranked]
            finish = 1 + self._costs[state][0] if ranked else math.inf
            self.min_tokens[state] = 0 if state in automaton.accepting else finish
        if math.isinf(self.min_tokens[0]):
            raise ValueError("this tokenizer cannot write any complete answer of the codec")

    def _moves(self, trie: dict, state: int) -> list[tuple[int, int]]:
        """(token id, state after it) for every token whose whole text the automaton reads from `state`."""
        moves, stack = [], [(trie, state)]
        while stack:
            node, at = stack.pop()
            for c, nxt in self.automaton.edges[at].items():
                child = node.get(c)
                if child is not None:
                    moves.extend((t, nxt) for t in child.get(self._END, ()))
                    stack.append((child, nxt))
        return moves

    def step(self, state: int | None, token_id: int) -> int | None:
        return None if state is None else self._next[state].get(token_id)

    def allowed(self, state: int, budget: float = math.inf) -> torch.Tensor:
        """Token ids that keep a valid prefix and leave an answer that `budget` more tokens can finish."""
        return self._ids[state][: bisect.bisect_right(self._costs[state], budget)]

    def logits_processor(self, max_new_tokens: int | None = None,
                         eos_token_id: int | Sequence[int] | None = None) -> AnswerLogitsProcessor:
        if max_new_tokens is not None and self.min_tokens[0] > max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} cannot hold a complete answer: the shortest "
                             f"takes {int(self.min_tokens[0])} tokens")
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        return AnswerLogitsProcessor(self, max_new_tokens, [eos] if isinstance(eos, int) else list(eos))


_DONE = -1  # the row has written EOS (generate pads it from then on)


class AnswerLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the answer language; one instance per `generate` call (the first call
    sees the prompt, so it fixes where the answer starts). Rows are tracked by their generated ids, so beam
    reordering is harmless."""

    def __init__(self, constraint: TokenConstraint, max_new_tokens: int | None, eos_token_ids: list[int]) -> None:
        self.constraint = constraint
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = torch.tensor(eos_token_ids, dtype=torch.long)
        self._eos = set(eos_token_ids)
        self._prompt_length: int | None = None
        self._states: dict[tuple[int, ...], int | None] = {}  # generated ids -> automaton state

    def _advance(self, state: int | None, token_id: int) -> int | None:
        if state is None or state == _DONE:
            return state
        return _DONE if token_id in self._eos else self.constraint.step(state, token_id)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        generated = input_ids[:, self._prompt_length :].tolist()
        budget = math.inf if self.max_new_tokens is None else self.max_new_tokens - len(generated[0]) - 1
        states, keep = {}, torch.zeros(scores.shape, dtype=torch.bool)  # filled on the CPU, moved once
        for row, ids in enumerate(generated):
            key = tuple(ids)
            state = states[key] = self._advance(self._states.get(key[:-1]), key[-1]) if key else 0
            if state is None or state == _DONE:  # off the language (not by this processor) or finished: end
                keep[row, self.eos_token_ids] = True
                continue
            keep[row, self.constraint.allowed(state, budget)] = True
            if state in self.constraint.automaton.accepting:
                keep[row, self.eos_token_ids] = True
        self._states = states  # only the current length is needed next step
        return scores.masked_fill(~keep.to(scores.device), -math.inf)
