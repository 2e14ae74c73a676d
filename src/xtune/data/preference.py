"""Preference pairs (TRL's conversational forms) -> two tokenised documents per pair.

Accepted lines:
  explicit  {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
  implicit  {"chosen": [conversation], "rejected": [conversation]}: the longest common prefix of the
            two message lists is the prompt, the rest are the responses.

Each half is `prompt + response` rendered with the chat template as one conversation (so its ids are
exactly `apply_chat_template(prompt + response)`); only the response's messages are trained (a prompt's
own assistant turns are context). The pair is stored as two consecutive samples, chosen then rejected,
and the packer keeps both in one row as two isolated documents.

Truncation, only for a pair that does not fit (a document over `sample_max_length`, or the pair over
`pack_max_length`): each document gets at most D = min(sample_max_length, pack_max_length // 2) tokens;
the prompt keeps its last tokens (at most what the longer response leaves, but never less than D / 2)
and both responses keep their first tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from xtune.data.records import Record, load_line, parse_record
from xtune.data.types import IGNORE_INDEX


@dataclass
class PreferencePair:
    prompt: list[dict[str, Any]]  # raw messages, as in the file
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    source: str  # "file:line"
    meta: dict[str, Any]


def _messages(obj: dict[str, Any], key: str, fail) -> list[dict[str, Any]]:
    value = obj[key]
    if isinstance(value, dict):  # one message given as an object
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise fail(f"'{key}' must be a list of messages (TRL's conversational form)")
    return value


def _empty(messages: list[dict[str, Any]]) -> bool:
    def text(c):
        if isinstance(c, list):
            return "".join(p.get("text", "") if isinstance(p, dict) and p.get("type") == "text" else "x" for p in c)
        return c or ""

    return not messages or all(not str(text(m.get("content"))).strip() for m in messages)


def parse_pair(file: str, lineno: int, line: str) -> PreferencePair:
    """One JSONL line -> a pair, or DataError naming file:line and the problem."""
    where, obj, fail = load_line(file, lineno, line)
    if not isinstance(obj, dict):
        raise fail("a preference record must be an object with 'chosen' and 'rejected'")
    for key in ("chosen", "rejected"):
        if key not in obj:
            hint = " (this looks like SFT data: 'messages')" if "messages" in obj else ""
            raise fail(f"no '{key}' key{hint}; a preference record has 'chosen' and 'rejected' "
                       "(and optionally 'prompt')")
    chosen, rejected = _messages(obj, "chosen", fail), _messages(obj, "rejected", fail)
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected")}
    if "prompt" in obj:
        prompt = _messages(obj, "prompt", fail)
        if not prompt:
            raise fail("'prompt' is empty")
    else:  # implicit prompt: the shared prefix of the two conversations
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise fail("'chosen' and 'rejected' share no common prefix (the implicit prompt); "
                       "give the prompt explicitly with a 'prompt' key")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, resp in (("chosen", chosen), ("rejected", rejected)):
        if _empty(resp):
            raise fail(f"empty '{key}' response")
    if chosen == rejected:
        raise fail("'chosen' and 'rejected' are identical")
    return PreferencePair(prompt, chosen, rejected, where, meta)


def pair_records(pair: PreferencePair, file: str, lineno: int, media_root: str) -> tuple[Record, Record]:
    """The two conversations of a pair as Records (the shared validation of formats.parse_record), with
    every prompt message untrained and every response message trained."""
    out = []
    for resp in (pair.chosen, pair.rejected):
        msgs = [dict(m, loss=False) for m in pair.prompt] + [dict(m, loss=m.get("role") == "assistant")
                                                             for m in resp]
        line = json.dumps({**pair.meta, "messages": msgs})
        out.append(parse_record(file, lineno, line, media_root))
    return out[0], out[1]


def first_trained(trained: np.ndarray) -> int:
    hits = np.flatnonzero(trained)
    return int(hits[0]) if len(hits) else len(trained)


def truncate_pair(halves: list[tuple[np.ndarray, np.ndarray]], max_doc: int, max_pair: int
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool]:
    """(ids, trained) of chosen and rejected -> the same, truncated as the module docstring says.

    The prompt is the tokens before the first trained one; both halves share it."""
    if max(len(i) for i, _ in halves) <= max_doc and sum(len(i) for i, _ in halves) <= max_pair:
        return halves, False
    limit = min(max_doc, max_pair // 2)
    p = min(first_trained(t) for _, t in halves)
    longest = max(len(i) - p for i, _ in halves)
    keep_p = min(p, max(limit - longest, limit // 2))
    out = []
    for ids, tr in halves:
        a = p - keep_p
        b = min(len(ids), a + limit)
        out.append((ids[a:b], tr[a:b]))
    return out, True


def labels_of(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Shifted labels (see types.Sample)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return labels
