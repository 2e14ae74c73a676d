"""Checks of the `gen` section (generation settings): every problem names the key, the value and what is allowed."""

from __future__ import annotations

from xtune.config.schema import GenSpec


def gen_problems(g: GenSpec) -> list[str]:
    problems: list[str] = []
    for key, value in (("max_new_tokens", g.max_new_tokens), ("n", g.n), ("batch_size", g.batch_size),
                       ("repetition_penalty", g.repetition_penalty)):
        if value <= 0:
            problems.append(f"gen.{key}={value}: must be > 0")
    if g.temperature < 0:
        problems.append(f"gen.temperature={g.temperature}: must be >= 0 (0 is greedy decoding)")
    if not 0 < g.top_p <= 1:
        problems.append(f"gen.top_p={g.top_p}: must be in (0, 1] (1.0 turns nucleus sampling off)")
    if g.top_k < 0:
        problems.append(f"gen.top_k={g.top_k}: must be >= 0 (0 turns top-k off)")
    if g.n > 1 and g.temperature == 0:
        problems.append(f"gen.n={g.n} with gen.temperature=0 (greedy) would give {g.n} identical completions: "
                        "set gen.temperature > 0 to sample them, or gen.n=1")
    empty = [i for i, s in enumerate(g.stop) if not isinstance(s, str) or s == ""]
    if empty:
        problems.append(f"gen.stop[{empty[0]}]: a stop string must be a non-empty string")
    return problems
