"""End-of-run samples: greedy completions of `train.sample_prompts` by the exported model, through the generation
engine (`xtune.generate`).

The model is built with transformers' own class for the family and the export's weights are read back by the
adapter (`generate.load.load_export`), so an export in Intern-S1's original `interns1` layout (whose config names
remote code that does not run on transformers 5, and whose `auto_map` has no image-text class) generates without
running any code from the folder. What is generated from is what was written: the export, not the training copy.
The prompt is rendered with `enable_thinking=False` (the empty think block the trained answers follow), as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import transformers

from xtune.config.schema import GenSpec
from xtune.generate import Generator
from xtune.generate.load import load_export

DISPLAY_CHARS = 160


def display(text: str, limit: int = DISPLAY_CHARS) -> str:
    """One readable line: line breaks shown as ' ⏎ ' with blank lines and whitespace runs collapsed, cut with an
    ellipsis past `limit` characters; an answer of nothing but whitespace (an undertrained model) is '(empty)'."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    flat = " ⏎ ".join(line for line in lines if line)
    if not flat:
        return "(empty)"
    return flat if len(flat) <= limit else flat[:limit - 1].rstrip() + "…"


def generate_samples(adapter, tokenizer, hf_dir: Path, prompts: list[str], max_new_tokens: int, step: int,
                     out_file: Path | None = None, log: Callable[[str], None] = print,
                     text_log: Callable[[str, str, int], None] | None = None) -> list:
    """Greedy completions of `prompts` by the export at `hf_dir` (this process only: rank 0 of a run); appended to
    `out_file` (JSON lines, full text), shown in `log` as one readable line each and given to
    `text_log(tag, markdown, step)` (TensorBoard text)."""
    transformers.utils.logging.disable_progress_bar()
    generator = Generator(load_export(adapter, hf_dir), tokenizer, family=adapter.family, shard_ranks=False)
    spec = GenSpec(max_new_tokens=max_new_tokens, enable_thinking=False, batch_size=max(1, len(prompts)))
    out = []
    for prompt, (completion,) in zip(prompts, generator.generate(prompts, spec)):
        text = completion.text
        out.append({"step": step, "prompt": prompt, "completion": text})
        log(f"sample @ step {step}> {display(prompt, 80)} -> {display(text)}")
        if text_log is not None:
            text_log(f"samples/{len(out) - 1}", f"**{prompt}**\n\n{text}", step)
    if out_file is not None:
        with open(out_file, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in out)
    return out
