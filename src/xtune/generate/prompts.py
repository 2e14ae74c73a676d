"""Prompts -> token ids (and image tiles), rendered with the chat template the way training renders it.

A prompt is a string (one user turn) or a list of chat messages (`{"role", "content"}`) ending with a user
turn; a message's content may be a list of parts (`text`, `image` / `image_url` with a local path), read by the
data stage's own record parser (`data.records.parse_record`), so the same content forms are accepted.

The template is the one training used (`data.templates.resolve_template`: the tokenizer's own, else the family's
built-in one) and is applied with `add_generation_prompt=True`. Training labels start right after that
generation header, so the model generates what it was trained to generate from there: for Qwen3-style templates
that is the (empty) `<think>\\n\\n</think>\\n\\n` block, then the answer. `gen.enable_thinking` (true / false) is
passed to the template when set; null passes nothing, as training did. A thinking block is returned in the
completion as generated; `xtune eval` strips it before scoring.

The text is tokenised as the data stage tokenises it (no special tokens added), and each `<IMG_CONTEXT>`
placeholder becomes `<img>` + tiles x tokens_per_tile `<IMG_CONTEXT>` + `</img>`, with the tiles of
`data.multimodal.load_tiles` (the training tiling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xtune.data import multimodal
from xtune.data.records import parse_record
from xtune.data.templates import TEMPLATE_ERRORS, Renderer, resolve_template, template_error
from xtune.errors import DataError

Prompt = str | Sequence[dict]


@dataclass(frozen=True)
class ImageSettings:
    """How images are tiled for a vision-language model (the run's model.image_size, ...): the `processor`."""

    image_size: int = 448
    tokens_per_tile: int = 256
    max_tiles: int = 12
    use_thumbnail: bool = True

    @classmethod
    def of(cls, model_spec) -> ImageSettings:
        return cls(model_spec.image_size, model_spec.tokens_per_tile, model_spec.max_tiles, model_spec.use_thumbnail)


@dataclass
class Rendered:
    ids: list[int]
    pixel_values: torch.Tensor | None = None  # [tiles, 3, S, S] for the images of this prompt


def messages_of(prompt: Prompt) -> list:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise DataError("a prompt given as messages must be a non-empty list of {role, content} ending with a "
                        "user turn")
    return messages


class PromptRenderer:
    """Renders prompts for one tokenizer and template (the family's built-in one when the tokenizer has none)."""

    def __init__(self, tokenizer, template: str = "auto", family: str = "qwen3",
                 images: ImageSettings | None = None):
        self.tokenizer = tokenizer
        # As the data stage: the tokenizer's template, else data.template's, else the family's (qwen3 for auto).
        self.template = resolve_template(tokenizer, template, family)
        self.renderer = Renderer(tokenizer, self.template)
        self.images = images

    def text(self, messages: list, enable_thinking: bool | None) -> str:
        if enable_thinking is None:
            return self.renderer.render(messages, add_generation_prompt=True)
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=enable_thinking)
        except TEMPLATE_ERRORS as e:
            raise template_error(e, self.tokenizer) from None

    def render(self, prompt: Prompt, enable_thinking: bool | None = None) -> Rendered:
        record = parse_record("<prompt>", 1, json.dumps({"messages": messages_of(prompt)}), os.getcwd())
        text = self.text(record.messages, enable_thinking)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not record.images and multimodal.IMG_CONTEXT not in text:
            return Rendered(list(ids))
        return self._with_images(list(ids), [im.path for im in record.images])

    def _with_images(self, ids: list[int], paths: list[str]) -> Rendered:
        if self.images is None:
            raise DataError("the prompt has an image but the model is not a vision-language model")
        start, ctx, end = (self.tokenizer.convert_tokens_to_ids(t)
                           for t in (multimodal.IMG_START, multimodal.IMG_CONTEXT, multimodal.IMG_END))
        where = [i for i, t in enumerate(ids) if t == ctx]
        if len(where) != len(paths):
            raise DataError(f"{len(where)} {multimodal.IMG_CONTEXT} placeholder(s) for {len(paths)} image(s)")
        s, out, tiles, prev = self.images, [], [], 0
        for k, path in zip(where, paths):
            try:
                multimodal.probe_image(path)
            except (OSError, ValueError) as e:
                raise DataError(f"--image {path}: {e}") from None
            pixels = multimodal.load_tiles(path, s.image_size, s.max_tiles, s.use_thumbnail)
            out += ids[prev:k] + [start] + [ctx] * (len(pixels) * s.tokens_per_tile) + [end]
            tiles.append(pixels)
            prev = k + 1
        return Rendered(out + ids[prev:], torch.cat(tiles))
