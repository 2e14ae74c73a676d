"""Prompt records for online RL (`xtune grpo`): read, validated with located errors, tokenised with the chat
template's generation prompt, and drawn in a seeded, resumable order.

A record is `{"prompt": "text" | [messages], ...}` or `{"messages": [...], ...}` whose last message is a user turn;
every other key (e.g. `answer`) is kept as a field for the rewards. Any source the data stage reads works (JSONL,
JSON, parquet, arrow, a folder, hf://); a bad record is a DataError naming file:line (or skipped and counted with
data.on_error=skip). The prompt is rendered by the tokenizer's chat template (else data.template's) with the
generation prompt and `gen.enable_thinking`, as the end-of-run samples are; a prompt longer than
grpo.max_prompt_length tokens keeps its last tokens (the question and the assistant header).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtune.config.schema import RunSpec
from xtune.data.mix import ratio_indices
from xtune.data.records import load_line, parse_record
from xtune.data.sources import iter_file, list_files
from xtune.data.templates import TEMPLATE_ERRORS, Renderer, resolve_template, template_error
from xtune.errors import DataError

log = logging.getLogger("xtune.data")
PROMPT_KEYS = ("prompt", "messages")


@dataclass
class Prompt:
    ids: list[int]  # the rendered prompt with the assistant header, at most grpo.max_prompt_length tokens
    prompt: object  # as the record gave it (a string or a list of messages): what user rewards receive
    fields: dict[str, object]  # the record's other keys
    source: str  # file:line


def _messages(obj, fail) -> tuple:
    if not isinstance(obj, dict) or not any(k in obj for k in PROMPT_KEYS):
        raise fail("a prompt record is an object with a 'prompt' (text or messages) or 'messages' key")
    key = "prompt" if "prompt" in obj else "messages"
    raw = obj[key]
    messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(messages, list) or not messages:
        raise fail(f"'{key}' must be a string or a non-empty list of messages")
    return raw, messages, {k: v for k, v in obj.items() if k not in PROMPT_KEYS}


def parse_prompt(file: str, locator, line: str, media_root: str) -> tuple:
    """(prompt as given, messages, fields, source) of one record; DataError naming file:line."""
    where, obj, fail = load_line(file, locator, line)
    raw, messages, fields = _messages(obj, fail)
    rec = parse_record(file, locator, json.dumps({"messages": messages}), media_root)
    if rec.images:
        raise fail("images in grpo prompts are not supported yet")
    if rec.messages[-1]["role"] != "user":
        raise fail(f"the last message must be a user turn (the prompt to answer), got {rec.messages[-1]['role']!r}")
    return raw, rec.messages, fields, where


class PromptSet:
    """Every prompt of the run's datasets (sample_ratio applied), tokenised once."""

    def __init__(self, spec: RunSpec, tokenizer):
        d = spec.data
        self.template = resolve_template(tokenizer, d.template, spec.model.family or "qwen3")
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer, self.template)
        self.enable_thinking = spec.gen.enable_thinking
        self.max_length = spec.grpo.max_prompt_length
        self.items: list[Prompt] = []
        self.skipped: list[str] = []
        self.too_long = 0
        for i, ds in enumerate(d.datasets):
            found = self._read(ds, d.on_error == "skip")
            keep = ratio_indices(len(found), ds.sample_ratio, spec.train.seed, i)
            self.items.extend(found[j] for j in keep)
        if not self.items:
            raise DataError(f"no usable prompt in data.datasets ({', '.join(ds.path for ds in d.datasets)})"
                            + (f"; {len(self.skipped)} skipped, first: {self.skipped[0]}" if self.skipped else ""))
        log.info("grpo prompts: %d (%d longer than %d tokens left out, %d bad records skipped)", len(self.items),
                 self.too_long, self.max_length, len(self.skipped))

    def _read(self, ds, skip: bool) -> list[Prompt]:
        out = []
        for file in list_files(ds.path):
            media_root = ds.media_root or str(Path(file).parent)
            for locator, line in iter_file(file):
                try:
                    raw, messages, fields, where = parse_prompt(file, locator, line, media_root)
                    ids = self.encode(messages, where)
                    if len(ids) > self.max_length:
                        self.too_long += 1
                        continue
                    out.append(Prompt(ids, raw, fields, where))
                except DataError as e:
                    if not skip:
                        raise
                    self.skipped.append(str(e))
        return out

    def encode(self, messages, where: str) -> list[int]:
        try:
            if self.enable_thinking is None:
                text = self.renderer.render(messages, add_generation_prompt=True)
            else:
                text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                          add_generation_prompt=True,
                                                          enable_thinking=self.enable_thinking)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except TEMPLATE_ERRORS as e:
            raise DataError(f"{where}: {template_error(e, self.tokenizer)}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prompt:
        return self.items[i]


class PromptStream:
    """Prompt indices in a fresh seeded permutation per pass; `consumed` (in the checkpoint) is the whole state."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.consumed = size, seed, 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, pos = divmod(self.consumed, self.size)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            n = min(k - len(out), self.size - pos)
            out.extend(int(i) for i in perm[pos:pos + n])
            self.consumed += n
        return out

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
