"""An eval task's records -> items (prompt, reference, options), read by the data stage's own readers.

- messages (also sharegpt, converted): the conversation up to its last assistant turn is the prompt, that turn
  the reference;
- alpaca: instruction (+ input) is the user turn, output the reference (converted as the data stage does);
- fields: `eval.prompt_field` (or `eval.template` over all fields) and `eval.reference_field`; with the choice
  scorer `eval.choices_field` lists the options and the reference is an index, a letter or the option's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from xtune.config.schema_eval import EvalSpec
from xtune.data.convert import detect, rename, to_messages
from xtune.data.sources import iter_file, list_files
from xtune.errors import DataError

Prompt = list[dict[str, Any]]


@dataclass
class EvalItem:
    prompt: Prompt  # chat messages ending with a user turn (rendered by the Generator with the chat template)
    reference: str
    source: str  # file:line
    record: dict[str, Any] = field(default_factory=dict)
    choices: list[str] | None = None
    answer_index: int | None = None


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _from_messages(obj: dict, spec: EvalSpec, where: str) -> EvalItem:
    msgs = obj["messages"] if isinstance(obj, dict) else obj
    last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"{where}: no assistant turn after a prompt: the last assistant turn is the reference")
    prompt = [{"role": m["role"], "content": m.get("content")} for m in msgs[:last]]
    if spec.system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": spec.system})
    record = {k: v for k, v in obj.items() if k != "messages"} if isinstance(obj, dict) else {}
    return EvalItem(prompt, _content_text(msgs[last].get("content")), where, record)


def _answer_index(ref, choices: list[str], where: str) -> int:
    if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(choices):
        return ref
    text = str(ref).strip()
    if len(text) == 1 and text.isalpha() and ord(text.upper()) - ord("A") < len(choices):
        return ord(text.upper()) - ord("A")
    if text.isdigit() and int(text) < len(choices):
        return int(text)
    if text in choices:
        return choices.index(text)
    raise DataError(f"{where}: reference {ref!r} is neither an index, a letter nor one of the {len(choices)} options")


def _from_fields(obj: dict, spec: EvalSpec, where: str) -> EvalItem:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a fields record must be a JSON object")
    if spec.template is not None:
        try:
            text = spec.template.format(**obj)
        except (KeyError, IndexError) as e:
            raise DataError(f"{where}: eval.template names {e} but the record has keys {sorted(obj)}") from None
    elif isinstance(obj.get(spec.prompt_field), str):
        text = obj[spec.prompt_field]
    else:
        raise DataError(f"{where}: no string {spec.prompt_field!r} (eval.prompt_field); the record has keys {sorted(obj)}")
    if spec.reference_field not in obj:
        raise DataError(f"{where}: no {spec.reference_field!r} (eval.reference_field); the record has keys {sorted(obj)}")
    ref = obj[spec.reference_field]
    prompt = ([{"role": "system", "content": spec.system}] if spec.system else []) + [{"role": "user", "content": text}]
    item = EvalItem(prompt, str(ref), where, obj)
    if spec.scorer == "choice":
        choices = obj.get(spec.choices_field)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{where}: the choice scorer needs a list of options in {spec.choices_field!r} "
                            "(eval.choices_field)")
        item.choices = [str(c) for c in choices]
        item.answer_index = _answer_index(ref, item.choices, where)
        item.reference = item.choices[item.answer_index]
    return item


def _format_of(obj, spec: EvalSpec, where: str) -> str:
    if spec.data.format != "auto":
        return spec.data.format
    if isinstance(obj, dict) and spec.reference_field in obj and ("messages" not in obj):
        return "fields"
    found = detect(obj)
    if found in (None, "text"):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{where}: format auto: the record ({keys}) is neither messages, sharegpt, alpaca nor has "
                        f"eval.reference_field={spec.reference_field!r}; set eval.data.format / the field names")
    return found


def load_items(spec: EvalSpec) -> list[EvalItem]:
    """The task's first `eval.limit` items, in file order; DataError naming file:line on a bad record."""
    items: list[EvalItem] = []
    fmt = None
    for file in list_files(spec.data.path):
        for loc, text in iter_file(file):
            where = f"{file}:{loc}"
            try:
                obj = rename(json.loads(text), spec.data.columns or {})
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            fmt = fmt or _format_of(obj, spec, where)
            if fmt == "fields":
                items.append(_from_fields(obj, spec, where))
            else:
                try:
                    obj = to_messages(obj, fmt)
                except ValueError as e:
                    raise DataError(f"{where}: {e}") from None
                items.append(_from_messages(obj, spec, where))
            if spec.limit is not None and len(items) >= spec.limit:
                return items
    return items
