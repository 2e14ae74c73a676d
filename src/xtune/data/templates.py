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

from jinja2 import TemplateError

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
    """Renders conversations with one template and knows its turn markers.

    Rendering is what `apply_chat_template(..., tokenize=False)` returns, character for character,
    but done directly with a template compiled once per process (see `_FastSandbox`): the same
    preprocessing of the messages, the same sandbox, globals and filters as transformers, minus
    its per-call overhead. If transformers' internals are not what this expects, or a probe
    conversation renders differently, `render` falls back to `apply_chat_template`.
    """

    _PROBE = "xtune-probe-7f3a"

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        self._fast = _fast_renderer(tokenizer, template)
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
        try:
            if self._fast is not None:
                text = self._fast(messages, tools, add_generation_prompt)
                if text is not None:
                    return text
            return self.reference_render(messages, tools, add_generation_prompt)
        except TEMPLATE_ERRORS as e:
            raise template_error(e, self.tokenizer) from None

    def reference_render(self, messages: List[Dict[str, Any]], tools: Optional[list] = None,
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


# -- fast rendering ----------------------------------------------------------------------------------
_JSON_SCALARS = (str, int, float, bool, type(None))
_PROBE_CHATS = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"},
     {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello", "name": None}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
)
_PROBE_TOOLS = [{"type": "function", "function": {"name": "get", "description": "weather",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _plain_json(value: Any) -> bool:
    """True when `value` holds only exact JSON types (what parsed JSONL records are made of)."""
    tp = type(value)
    if tp is dict:
        for k, v in value.items():
            if type(k) is not str or (type(v) not in _JSON_SCALARS and not _plain_json(v)):
                return False
        return True
    if tp is list:
        for v in value:
            if type(v) not in _JSON_SCALARS and not _plain_json(v):
                return False
        return True
    return tp in _JSON_SCALARS


def _fast_renderer(tokenizer, template: str):
    """A function (messages, tools, add_generation_prompt) -> text equal to `apply_chat_template`'s,
    returning None for inputs it does not handle; None when it cannot be built or fails the probes."""
    try:
        from transformers.utils import chat_template_utils as ctu

        compiled = _compile(template)
        kwargs = dict(tokenizer.special_tokens_map)
        alias = ctu._alias_reasoning_fields
        own = getattr(tokenizer, "chat_template", None)
    except Exception:  # noqa: BLE001 - any surprise in transformers' internals: use apply_chat_template
        return None
    if compiled is None or not _plain_json(kwargs) or (isinstance(own, dict) and template in own):
        return None

    def render(messages, tools=None, add_generation_prompt=False):
        if type(messages) is not list or (tools is not None and (type(tools) is not list or not all(
                type(t) is dict for t in tools))):
            return None
        # apply_chat_template: keys whose value is None are dropped, then the messages (plain JSON
        # here, so transformers' conversion to plain data is a copy) get their reasoning aliases.
        chat = []
        for m in messages:
            if type(m) is not dict:
                return None
            m = {k: v for k, v in m.items() if v is not None}
            if not _plain_json(m):
                return None
            chat.append(m)
        if tools is not None and not _plain_json(tools):
            return None
        chat = alias(chat)
        return compiled.render(messages=chat, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **kwargs)

    compared = 0
    for chat in _PROBE_CHATS:
        for tools in (None, _PROBE_TOOLS):
            for gen in (False, True):
                try:  # a template may reject a probe (e.g. strict role alternation): skip that one
                    ref = tokenizer.apply_chat_template(chat, tools=tools, chat_template=template,
                                                        tokenize=False, add_generation_prompt=gen)
                except Exception:  # noqa: BLE001
                    continue
                try:
                    if render(chat, tools, gen) != ref:
                        return None
                except Exception:  # noqa: BLE001
                    return None
                compared += 1
    return render if compared else None


@lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled once per process in a `_FastSandbox` configured like transformers' environment."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils import chat_template_utils as ctu

    ref_env = ctu._compile_jinja_template(template).environment
    if type(ref_env) is not ImmutableSandboxedEnvironment:
        return None
    env = _fast_sandbox_class()(
        trim_blocks=ref_env.trim_blocks, lstrip_blocks=ref_env.lstrip_blocks,
        keep_trailing_newline=ref_env.keep_trailing_newline, autoescape=ref_env.autoescape,
        finalize=ref_env.finalize, undefined=ref_env.undefined, newline_sequence=ref_env.newline_sequence,
        extensions=[type(e) for e in ref_env.extensions.values()],
    )
    env.filters.update(ref_env.filters)
    env.tests.update(ref_env.tests)
    env.globals.update(ref_env.globals)
    env.policies.update(ref_env.policies)
    return env.from_string(template)


@lru_cache(maxsize=None)
def _fast_sandbox_class():
    """jinja2's ImmutableSandboxedEnvironment with its checks short-cut where the answer is known.

    Same decisions as the sandbox, cheaper to reach: `message.role` on a plain dict is looked up
    as a key directly when `dict` has no such attribute (the sandbox tries the attribute first and
    pays for an AttributeError); safety verdicts on attributes of exact builtin types depend only
    on (type, name) and are cached, and public str methods other than `format` / `format_map`
    are always handed out unchanged; bound builtin methods (`str.startswith`, ...) cannot carry the
    `unsafe_callable` / `alters_data` markers.
    """
    import types

    import jinja2.runtime
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    dict_attrs = frozenset(dir(dict))
    # str methods the sandbox hands out unchanged (public, not `format` / `format_map`, which it wraps)
    str_methods = frozenset(a for a in dir(str) if not a.startswith("_") and a not in ("format", "format_map"))
    # Types whose verdicts are a function of (type, name): no instance can change what
    # `isinstance` answers for them (none defines `__class__`) and the name is all that is checked.
    cacheable = {str, dict, list, tuple, int, float, bool, type(None), jinja2.runtime.LoopContext,
                 jinja2.utils.Namespace}
    safe_cache: Dict[tuple, bool] = {}

    class _FastSandbox(ImmutableSandboxedEnvironment):
        def getattr(self, obj, attribute):
            tp = type(obj)
            if tp is dict and attribute not in dict_attrs:
                try:
                    return obj[attribute]
                except LookupError:
                    return self.undefined(obj=obj, name=attribute)
            if tp is str and attribute in str_methods:
                return getattr(obj, attribute)
            return super().getattr(obj, attribute)

        def is_safe_attribute(self, obj, attr, value):
            tp = type(obj)
            if type(attr) is str and (tp in cacheable or _namespace_class(tp)):
                key = (tp, attr)
                ok = safe_cache.get(key)
                if ok is None:
                    ok = safe_cache[key] = super().is_safe_attribute(obj, attr, value)
                return ok
            return super().is_safe_attribute(obj, attr, value)

        def is_safe_callable(self, obj):
            if type(obj) is types.BuiltinMethodType:
                return True
            return super().is_safe_callable(obj)

    def _namespace_class(tp) -> bool:
        # transformers' `namespace` global subclasses jinja2's Namespace
        if issubclass(tp, jinja2.utils.Namespace) and "__class__" not in vars(tp):
            cacheable.add(tp)
            return True
        return False

    return _FastSandbox
