"""Record formats mapped to xtune's messages: alpaca, sharegpt, text (continued pre-training), messages as is;
`columns` renames fields first; `auto` detects the format from the dataset's first record.

The converters work on JSON text (what the readers in `sources` yield) and hand JSON text on to
`formats.parse_record`, which validates the messages and names file:line (or file:row N) in every error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from xtune.errors import DataError

FORMATS = ("auto", "messages", "alpaca", "sharegpt", "text")
# sharegpt speakers -> roles: function_call is the assistant's tool call, observation the tool's answer.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def detect(obj) -> str | None:
    """The format a record is in, or None."""
    if isinstance(obj, list):
        return "messages"
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def describe_keys(obj) -> str:
    return f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"


def rename(obj, columns: dict[str, str]):
    """`columns` maps xtune's field name to the dataset's: {messages: dialog} reads `dialog` as `messages`."""
    if columns and isinstance(obj, dict):
        obj = dict(obj)
        for ours, theirs in columns.items():
            if theirs in obj:
                obj[ours] = obj.pop(theirs)
    return obj


def to_messages(obj, fmt: str) -> dict:
    """One record in `fmt` as {"messages": [...], **other fields}. Raises ValueError with the problem."""
    if fmt == "messages":
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"a {fmt} record must be a JSON object, got {describe_keys(obj)}")
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"alpaca record needs a string {key!r} ({describe_keys(obj)})")
        prompt = obj["instruction"]
        if obj.get("input"):
            prompt = f"{prompt}\n\n{obj['input']}"
        msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else [])
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
        rest = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output", "system")}
        return {"messages": msgs, **rest}
    if fmt == "sharegpt":
        conv = obj.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"sharegpt record needs a non-empty 'conversations' list ({describe_keys(obj)})")
        msgs = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ValueError(f"conversations[{i}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise ValueError(f"conversations[{i}]: unknown speaker {turn['from']!r} "
                                 f"(expected one of {', '.join(SHAREGPT_ROLES)})")
            msgs.append({"role": role, "content": turn["value"]})
        rest = {k: v for k, v in obj.items() if k not in ("conversations", "system")}
        return {"messages": msgs, **rest}
    if fmt == "text":
        if not isinstance(obj.get("text"), str) or not obj["text"]:
            raise ValueError(f"text record needs a non-empty string 'text' ({describe_keys(obj)})")
        return {"messages": [{"role": "pretrain", "content": obj["text"]}]}
    raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


@dataclass(frozen=True)
class Converter:
    """Picklable (sent to the tokenising workers): JSON text in `fmt` -> JSON text in messages form."""

    fmt: str
    columns: dict[str, str] = field(default_factory=dict)

    def __call__(self, where: str, line: str) -> str:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return line  # parse_record reports it with the column
        try:
            return json.dumps(to_messages(rename(obj, self.columns), self.fmt))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None

    @property
    def is_identity(self) -> bool:
        return self.fmt == "messages" and not self.columns


def resolve_format(fmt: str, columns: dict[str, str], first_file: str, first: tuple) -> str:
    """`auto` -> the format of the dataset's first record (located error when it fits none)."""
    if fmt != "auto":
        return fmt
    where, line = first
    try:
        obj = rename(json.loads(line), columns)
    except json.JSONDecodeError:
        return "messages"  # the parser names the malformed line
    found = detect(obj)
    if found is None:
        hint = ("; it looks like preference data (chosen/rejected): train it with xtune dpo"
                if isinstance(obj, dict) and "chosen" in obj and "rejected" in obj else "")
        raise DataError(f"{first_file}:{where}: format auto: the record fits no format ({describe_keys(obj)}); "
                        "expected messages, conversations (sharegpt), instruction+output (alpaca) or text; "
                        "set data.datasets[].format or rename fields with data.datasets[].columns" + hint)
    return found
