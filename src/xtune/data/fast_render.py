"""Chat templates rendered without `apply_chat_template`'s per-call overhead: the one place that reaches into
transformers' and jinja2's internals for it.

Why it exists: on short chats rendering costs as much as tokenising, and `apply_chat_template` adds its own
per-call overhead on top of jinja2's (bench/README.md, the `data` benchmark, has the measured costs per chat).
The output must be `apply_chat_template(..., tokenize=False)`'s, character for character:

- the template is compiled once per process in an environment configured exactly like transformers'
  (its filters, globals, extensions and policies copied from `_compile_jinja_template`'s environment);
- the messages get the same preprocessing (keys whose value is None dropped, `_alias_reasoning_fields`);
- the environment is jinja2's `ImmutableSandboxedEnvironment` with three checks short-cut where the sandbox's
  answer is known (`_FastSandbox`): the same decisions, cheaper to reach. tests/unit/test_data_fast_render.py
  compares them with jinja2's own sandbox on every attribute of every type a template sees, and on hostile templates.

Checked against transformers 5.24 and jinja2 3.1.6 (`CHECKED`): with another major version of transformers,
another jinja2 minor version, inputs that are not plain JSON, or a probe conversation that renders
differently, `fast_renderer` returns None and xtune renders with `apply_chat_template`.
"""

from __future__ import annotations

import types
from functools import cache, lru_cache
from typing import Any

import jinja2
import jinja2.runtime
import jinja2.utils
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils import chat_template_utils as ctu

# The versions whose private names (`_compile_jinja_template`, `_alias_reasoning_fields`) and sandbox methods
# (`getattr`, `is_safe_attribute`, `is_safe_callable`) this module was checked against: a prefix of the
# installed version must match (transformers 5.x, jinja2 3.1.x).
CHECKED = {"transformers": (5,), "jinja2": (3, 1)}


def versions_supported() -> bool:
    for mod in (transformers, jinja2):
        want = CHECKED[mod.__name__]
        try:
            have = tuple(int(x) for x in mod.__version__.split(".")[:len(want)])
        except ValueError:
            return False
        if have != want:
            return False
    return True


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


def fast_renderer(tokenizer, template: str):
    """A function (messages, tools, add_generation_prompt) -> text equal to `apply_chat_template`'s,
    returning None for inputs it does not handle; None when it cannot be built or fails the probes."""
    if not versions_supported():
        return None
    try:
        compiled = compile_template(template)
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
def compile_template(template: str):
    """The template compiled once per process in a `_FastSandbox` configured like transformers' environment."""
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


@cache
def _fast_sandbox_class():
    """jinja2's ImmutableSandboxedEnvironment with its checks short-cut where the answer is known.

    Same decisions as the sandbox, cheaper to reach: `message.role` on a plain dict is looked up
    as a key directly when `dict` has no such attribute (the sandbox tries the attribute first and
    pays for an AttributeError); safety verdicts on attributes of exact builtin types depend only
    on (type, name) and are cached, and public str methods other than `format` / `format_map`
    are always handed out unchanged; bound builtin methods (`str.startswith`, ...) cannot carry the
    `unsafe_callable` / `alters_data` markers.
    """
    dict_attrs = frozenset(dir(dict))
    # str methods the sandbox hands out unchanged (public, not `format` / `format_map`, which it wraps)
    str_methods = frozenset(a for a in dir(str) if not a.startswith("_") and a not in ("format", "format_map"))
    # Types whose verdicts are a function of (type, name): no instance can change what
    # `isinstance` answers for them (none defines `__class__`) and the name is all that is checked.
    cacheable = {str, dict, list, tuple, int, float, bool, type(None), jinja2.runtime.LoopContext,
                 jinja2.utils.Namespace}
    safe_cache: dict[tuple, bool] = {}

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
