"""The GRPO demo's shaped reward (`recipes/demo_grpo.yaml`): how close the last number of a completion is to the
record's `answer`. The exact-match reward (the `regex` scorer) is 0 for almost every answer of the tiny SFT model,
so alone it gives the policy little to learn from; closeness grows as answers approach the right number."""

import re

NUMBER = re.compile(r"-?\d+")


def closeness(prompts, completions, answer, **kwargs):
    """1 for the right number, falling linearly to 0 at 10 away (or with no number at all)."""
    out = []
    for text, want in zip(completions, answer):
        found = NUMBER.findall(text.split("</think>")[-1])
        out.append(max(0.0, 1.0 - abs(int(found[-1]) - int(want)) / 10.0) if found else 0.0)
    return out
