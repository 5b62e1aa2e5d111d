"""Appearance descriptions for KALIE's synthesis.

KALIE asks a vision LLM, once per object and with the image, for `n` descriptions of the object with a different
appearance but the same category, as a JSON list of strings (temperature 1.3, 3 attempts); each inpainting prompt
is one description plus ", top down view, highres, best quality, photorealistic".

- `ChatPrompts`: any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`, plain stdlib HTTP), with
  KALIE's prompts, JSON-list validation, retries with exponential backoff and a clear error when it gives up.
  Replies are cached (in memory, optionally in a JSON file) keyed by the image, task, object and n, so a rerun
  asks nothing; the recipe also writes them back into the entry (`other.prompts`), as KALIE does.
- `TemplatePrompts`: no LLM: per-object lists from the config, else seeded fills of appearance templates.
- `ChatFilter`: KALIE's optional VLM check of a synthetic image ("... Yes" keeps it).

All three follow the recipe's `PromptSource` (`descriptions(image, task, object_name, n) -> list[str]`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SYSTEM_PROMPT = ("You are a helpful assistant. You will receive an image, taken from a top-down robot's view, as "
                 "well as a task instruction. You will respond to all questions concisely and in exactly the format "
                 "requested.")
PROMPT_SUFFIX = ", top down view, highres, best quality, photorealistic"
FILTER_PROMPT = ("Could this image reasonably correspond to the task instruction \"{task}\"? Make sure you can "
                 "identify all objects in the list {objects}, one of each, and make sure none of these objects are "
                 "blurry, extremely malformed, or duplicated.")


def description_prompt(task_instruction: str, object_name: str, n: int) -> str:
    """KALIE's user prompt asking for `n` appearance variants of `object_name`."""
    return (f"This image, taken from a robot's point of view, corresponds to the task \"{task_instruction}\" For the "
            f"object {object_name} in the image, consider its object category. Then, sample {n} reasonable "
            "descriptions of the object with a different appearance but the same category. The description can "
            "include (a subset of) details such as colors, textures, and materials. Your final output should be a "
            "list of strings of object variant descriptions. Output format: \"[\"<description 1>\", "
            "\"<description 2>\", ... etc.]\".")


def generation_prompt(description: str) -> str:
    """The inpainting prompt KALIE builds from one description."""
    return description.strip() + PROMPT_SUFFIX


class PromptError(RuntimeError):
    """The chat endpoint gave no usable answer."""


class _Retry(Exception):
    """A failure worth another attempt (timeout, connection, 429/5xx, malformed reply)."""


def parse_description_list(text: str) -> list[str]:
    """The JSON list of strings in a reply, tolerating a Markdown code fence or words around it; ValueError
    saying what is wrong otherwise. Blank and repeated descriptions are dropped."""
    body = re.sub(r"```(?:json)?", "", text)
    start, end = body.find("["), body.rfind("]")
    if start < 0 or end <= start:
        raise ValueError(f"no JSON list in the reply: {text[:200]!r}")
    try:
        value = json.loads(body[start:end + 1])
    except json.JSONDecodeError as error:
        raise ValueError(f"the reply's list is not valid JSON ({error}): {text[:200]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a JSON list of strings, got {json.dumps(value)[:200]}")
    out: list[str] = []
    for item in (v.strip() for v in value):
        if item and item not in out:
            out.append(item)
    if not out:
        raise ValueError("the reply's list has no descriptions")
    return out


def image_data_url(image: np.ndarray, max_side: int | None = 512) -> str:
    """The image as a base64 PNG data URL (the OpenAI vision message format), shrunk to `max_side`."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if max_side and max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ChatClient:
    """A minimal OpenAI-compatible chat client: one JSON POST per attempt, retried with exponential backoff.

    The API key comes from `api_key` or the environment variable `api_key_env` (local servers need none). HTTP 429
    and 5xx, timeouts, connection errors and replies that fail `validate` are retried up to `max_attempts` in all,
    waiting `backoff * 2**k` s (at most `max_backoff`); other HTTP errors (a wrong URL, model or key) stop at once.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", max_attempts: int = 3, backoff: float = 1.0,
                 max_backoff: float = 30.0, timeout: float = 120.0, sleep: Callable[[float], None] = time.sleep):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self._api_key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        self.max_attempts, self.backoff, self.max_backoff = int(max_attempts), float(backoff), float(max_backoff)
        self.timeout, self._sleep = float(timeout), sleep

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def post(self, messages: list[dict], **params) -> str:
        """One request; the first choice's text. Raises _Retry or PromptError."""
        payload = json.dumps({"model": self.model, "messages": messages, **params}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            if error.code == 429 or error.code >= 500:
                raise _Retry(f"HTTP {error.code} from {self.url}: {detail}") from None
            raise PromptError(f"HTTP {error.code} from {self.url} (not retried): {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise _Retry(f"no answer from {self.url}: {getattr(error, 'reason', error)}") from None
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry(f"not a chat completion from {self.url}: {body[:200]!r}") from None
        if isinstance(content, list):  # some servers answer in content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise _Retry(f"the completion from {self.url} has no text content")
        return content

    def complete(self, messages: list[dict], validate: Callable[[str], object] = str, **params):
        """`validate(reply)` of the first reply that passes it, retrying as described above."""
        failures = []
        for attempt in range(self.max_attempts):
            if attempt:
                self._sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                return validate(self.post(messages, **params))
            except _Retry as error:
                failures.append(str(error))
            except ValueError as error:  # the reply came but is malformed
                failures.append(f"malformed reply: {error}")
        listing = "; ".join(f"attempt {i + 1}: {f}" for i, f in enumerate(failures))
        raise PromptError(f"{self.url} (model {self.model}) gave no usable answer in {self.max_attempts} "
                          f"attempts: {listing}")

    def describe(self) -> dict:  # never the key
        return {"endpoint": self.url, "model": self.model, "max_attempts": self.max_attempts,
                "backoff": self.backoff}


class ChatPrompts:
    """KALIE's description step on an OpenAI-compatible endpoint (see `ChatClient` for the connection options).

    `cache` (a dict, shared or fresh) and `cache_path` (a JSON file, read at start and rewritten atomically after
    each new answer) hold the replies keyed by image hash, task, object and n, so reruns need no LLM."""

    name = "chat"

    def __init__(self, base_url: str, model: str, *, temperature: float = 1.3, send_image: bool = True,
                 image_max_side: int | None = 512, cache: dict | None = None, cache_path: str | Path | None = None,
                 **client_options):
        self.client = ChatClient(base_url, model, **client_options)
        self.temperature, self.send_image, self.image_max_side = float(temperature), bool(send_image), image_max_side
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, list[str]] = cache if cache is not None else {}
        if self.cache_path and self.cache_path.exists():
            try:
                self.cache.update(json.loads(self.cache_path.read_text()))
            except (OSError, ValueError) as error:
                raise PromptError(f"prompt cache {self.cache_path} is unreadable: {error}") from error

    @staticmethod
    def cache_key(image: np.ndarray, task: str, object_name: str, n: int) -> str:
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()[:16]
        return f"{digest}|{task}|{object_name}|{n}"

    def messages(self, image: np.ndarray, task: str, object_name: str, n: int) -> list[dict]:
        text = description_prompt(task, object_name, n)
        user: str | list[dict] = text
        if self.send_image:
            user = [{"type": "image_url", "image_url": {"url": image_data_url(image, self.image_max_side)}},
                    {"type": "text", "text": text}]
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def descriptions(self, image: np.ndarray, task: str, object_name: str, n: int) -> list[str]:
        key = self.cache_key(image, task, object_name, n)
        if key not in self.cache:
            found = self.client.complete(self.messages(image, task, object_name, n), parse_description_list,
                                         temperature=self.temperature)
            self.cache[key] = found[:n]
            self._save()
        return list(self.cache[key])

    def _save(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.cache_path.with_name(self.cache_path.name + ".partial")
        partial.write_text(json.dumps(self.cache, indent=1, sort_keys=True))
        partial.replace(self.cache_path)

    def describe(self) -> dict:
        return {"prompts": self.name, **self.client.describe(), "temperature": self.temperature,
                "send_image": self.send_image, "cache_path": str(self.cache_path) if self.cache_path else None}


DEFAULT_TEMPLATES = ("{color} {name}", "{material} {name}", "{color} {material} {name}", "{pattern} {color} {name}")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey", "silver")
MATERIALS = ("wooden", "plastic", "metal", "glass", "ceramic", "fabric", "rubber", "paper", "leather")
PATTERNS = ("striped", "dotted", "shiny", "matte", "dark", "light", "bright", "pale")


class TemplatePrompts:
    """Descriptions without an LLM. `per_object` maps an object name to its list (from the config; the first n
    are used, cycled when fewer); other objects get n distinct fills of `templates` with colours, materials and
    patterns, drawn from a generator seeded by (seed, task, object) so every run gives the same ones."""

    name = "templates"

    def __init__(self, per_object: dict[str, list[str]] | None = None, templates: tuple[str, ...] | list[str] =
                 DEFAULT_TEMPLATES, *, colors: tuple[str, ...] | list[str] = COLORS,
                 materials: tuple[str, ...] | list[str] = MATERIALS, patterns: tuple[str, ...] | list[str] = PATTERNS,
                 seed: int = 0):
        self.per_object = {str(k): [str(d) for d in v] for k, v in (per_object or {}).items()}
        for name, listed in self.per_object.items():
            if not listed:
                raise ValueError(f"TemplatePrompts: the description list of {name!r} is empty")
        self.templates, self.colors = tuple(templates), tuple(colors)
        self.materials, self.patterns, self.seed = tuple(materials), tuple(patterns), int(seed)
        if not self.templates:
            raise ValueError("TemplatePrompts needs at least one template")

    def descriptions(self, image: np.ndarray, task: str, object_name: str, n: int) -> list[str]:
        if object_name in self.per_object:
            listed = self.per_object[object_name]
            return [listed[i % len(listed)] for i in range(n)]
        digest = hashlib.sha256(f"{self.seed}|{task}|{object_name}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        out: list[str] = []
        for _ in range(50 * max(1, n)):  # distinct fills while the vocabulary allows
            if len(out) == n:
                break
            text = rng.choice(self.templates).format(name=object_name, color=rng.choice(self.colors),
                                                     material=rng.choice(self.materials),
                                                     pattern=rng.choice(self.patterns))
            if text not in out:
                out.append(text)
        while len(out) < n:
            out.append(out[len(out) % max(1, len(out))] if out else object_name)
        return out

    def describe(self) -> dict:
        return {"prompts": self.name, "templates": list(self.templates), "per_object": self.per_object,
                "seed": self.seed}


class ChatFilter:
    """KALIE's optional filter: a synthetic image is kept when the VLM's answer to `FILTER_PROMPT` contains
    "Yes". Uses the same connection options as `ChatPrompts`."""

    name = "chat_filter"

    def __init__(self, base_url: str, model: str, *, temperature: float = 0.0, image_max_side: int | None = 512,
                 **client_options):
        self.client = ChatClient(base_url, model, **client_options)
        self.temperature, self.image_max_side = float(temperature), image_max_side

    def keep(self, image: np.ndarray, task: str, objects: list[str]) -> bool:
        text = FILTER_PROMPT.format(task=task, objects=objects)
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(image, self.image_max_side)}},
                        {"type": "text", "text": text}]}]
        return bool(self.client.complete(messages, lambda reply: "Yes" in reply, temperature=self.temperature))

    def describe(self) -> dict:
        return {"filter": self.name, **self.client.describe(), "temperature": self.temperature}
