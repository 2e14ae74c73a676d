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
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from xtune.errors import DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
BUILTIN = {"qwen3": "qwen3_tiny", "intern_s1": "intern_s1_tiny"}
FAMILY_TEMPLATE = {"qwen3": "qwen3", "qwen3_moe": "qwen3", "intern_s1": "intern_s1"}


@lru_cache(maxsize=None)
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
    """Renders conversations with one template and knows its turn markers."""

    _PROBE = "xtune-probe-7f3a"

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        user = [{"role": "user", "content": self._PROBE}]
        bare = self.render(user)
        prompted = self.render(user, add_generation_prompt=True)
        if not prompted.startswith(bare) or len(prompted) == len(bare):
            raise DataError("the chat template has no generation prompt; cannot find assistant turns")
        self.header = prompted[len(bare):]
        full = self.render(user + [{"role": "assistant", "content": self._PROBE}])
        tail = full[full.rindex(self._PROBE) + len(self._PROBE):]
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if not ids:
            raise DataError("the chat template renders nothing after an assistant message; no end-of-turn token")
        self.eot_id = int(ids[0])
        self.eot = tokenizer.convert_ids_to_tokens(self.eot_id)
        if not tail.startswith(self.eot):  # byte-level pieces would not be the literal text
            self.eot = tokenizer.decode([self.eot_id])

    def render(self, messages: List[Dict[str, Any]], tools: Optional[list] = None,
               add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
