"""Chat templates: which one renders a conversation, and the markers labels are found with.

The tokenizer's own `chat_template` wins; a tokenizer without one gets the built-in template
of the family (`data.template`, or `model.family` when it is `auto`). The built-in templates
are the ones shipped in `xtune/assets/tokenizers/*_tiny` (one source of truth).

Labels are located in the rendered text with two strings the template itself produces, so
no chat format is hand-written here:
- `header`: what `add_generation_prompt=True` appends (`<|im_start|>assistant\\n` for Qwen3):
  an assistant turn starts right after it.
- `eot`: the first token the template renders after an assistant message's content
  (`<|im_end|>`): the turn ends with it, and it is trained.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from xtune.data.fast_render import fast_renderer
from xtune.errors import DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
BUILTIN = {"qwen3": "qwen3_tiny", "intern_s1": "intern_s1_tiny"}
FAMILY_TEMPLATE = {"qwen3": "qwen3", "qwen3_moe": "qwen3", "intern_s1": "intern_s1"}


@cache
def builtin_template(name: str) -> str:
    if name not in BUILTIN:
        raise DataError(f"unknown chat template {name!r} (built-in: {', '.join(BUILTIN)})")
    cfg = json.loads((ASSETS / BUILTIN[name] / "tokenizer_config.json").read_text())
    return cfg["chat_template"]


def resolve_template(tokenizer, template: str = "auto", family: str = "qwen3") -> str:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one renders chats
        own = own.get("default")
    if isinstance(own, str) and own:
        return own
    name = FAMILY_TEMPLATE.get(family, "qwen3") if template == "auto" else template
    return builtin_template(name)


class Renderer:
    """Renders conversations with one template and knows its turn markers.

    Rendering is what `apply_chat_template(..., tokenize=False)` returns, character for character: through
    `fast_render` (a template compiled once per process) where it applies, else `apply_chat_template`
    itself (`fast=False` forces that). The markers (`header`, `eot`, `eot_id`) are found on first use, from
    probe conversations, so that a template that cannot render them fails while rendering a record, and
    the error names that record.
    """

    _PROBE = "xtune-probe-7f3a"

    def __init__(self, tokenizer, template: str, fast: bool = True):
        self.tokenizer = tokenizer
        self.template = template
        self._fast = fast_renderer(tokenizer, template) if fast else None
        self._markers = None

    @property
    def header(self) -> str:
        return (self._markers or self._find_markers())[0]

    @property
    def eot(self) -> str:
        return (self._markers or self._find_markers())[1]

    @property
    def eot_id(self) -> int:
        return (self._markers or self._find_markers())[2]

    def _find_markers(self):
        user = [{"role": "user", "content": self._PROBE}]
        bare = self.render(user)
        prompted = self.render(user, add_generation_prompt=True)
        if not prompted.startswith(bare) or len(prompted) == len(bare):
            raise DataError("the chat template has no generation prompt; cannot find assistant turns")
        header = prompted[len(bare):]
        full = self.render(user + [{"role": "assistant", "content": self._PROBE}])
        tail = full[full.rindex(self._PROBE) + len(self._PROBE):]
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if not ids:
            raise DataError("the chat template renders nothing after an assistant message; no end-of-turn token")
        eot_id = int(ids[0])
        eot = self.tokenizer.convert_ids_to_tokens(eot_id)
        if not tail.startswith(eot):  # byte-level pieces would not be the literal text
            eot = self.tokenizer.decode([eot_id])
        self._markers = (header, eot, eot_id)
        return self._markers

    def render(self, messages: list[dict[str, Any]], tools: list | None = None,
               add_generation_prompt: bool = False) -> str:
        try:
            if self._fast is not None:
                text = self._fast(messages, tools, add_generation_prompt)
                if text is not None:
                    return text
            return self.reference_render(messages, tools, add_generation_prompt)
        except TEMPLATE_ERRORS as e:
            raise template_error(e, self.tokenizer) from None

    def reference_render(self, messages: list[dict[str, Any]], tools: list | None = None,
                         add_generation_prompt: bool = False) -> str:
        """transformers' own rendering (slower; what `render` must equal)."""
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )


# A template that fails while rendering: jinja2's own errors (syntax, undefined, the sandbox's SecurityError,
# a template's raise_exception) and the Python errors its expressions raise on unexpected data.
TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError)


def template_error(e: Exception, tokenizer) -> DataError:
    """A DataError naming the template's tokenizer folder, the template line (jinja2 maps its frames to
    `<template>` lines; syntax errors carry `lineno`) and jinja2's reason. The caller adds the record."""
    line = getattr(e, "lineno", None)
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" line {line}" if line else ""
    folder = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    return DataError(f"the chat template of {folder} failed at template{where}: {type(e).__name__}: {e} "
                     "(fix the template, or pick another with data.template / model.tokenizer)")
