"""Load a run's tokenizer the one checked way: any failure is an XtuneError naming the folder, and the
tokenizer's ids must fit the model's vocabulary. Every command that needs a tokenizer (the gate of
`xtune sft`/`dpo`/`data inspect` and the trainer's preflight) goes through `load_checked_tokenizer`."""

from __future__ import annotations

from typing import Any

from xtune.config.files import vocab_problem
from xtune.errors import ConfigError, XtuneError
from xtune.models.base import ModelAdapter


def load_checked_tokenizer(adapter: ModelAdapter) -> Any:
    """The tokenizer of `adapter.spec`; XtuneError (exit 2) for an unreadable folder (a truncated
    tokenizer.json, a missing vocab file), ConfigError when its largest id is not a row of the model."""
    m = adapter.spec
    try:
        tokenizer = adapter.load_tokenizer()
    except XtuneError:
        raise
    except (OSError, ValueError) as e:  # json.JSONDecodeError and the tokenizers library's errors are ValueErrors
        raise XtuneError(f"could not load the tokenizer ({m.tokenizer or m.load_from}): {e}") from e
    problem = vocab_problem(m, tokenizer)
    if problem:
        raise ConfigError([problem])
    return tokenizer
