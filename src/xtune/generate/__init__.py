"""Sampling from any model xtune can load, and from the live model of a training process.

    from xtune.generate import Generator
    gen = Generator.from_path("work_dirs/demo/<run>")          # run dir | HF folder | PEFT adapter folder
    gen.generate(["What is 2 + 3?"], spec.gen)                # -> [[Completion(text, token_ids, finish_reason)]]

Modules: `load` (what a path is and its model), `prompts` (chat template as in training, images), `generator`
(batched `generate`, stops, log-likelihoods), `live` (a training module made ready to generate, FSDP2),
`shard` (ranks), `chat` (`xtune chat`).
"""

from xtune.generate.generator import Completion, Generator
from xtune.generate.prompts import ImageSettings

__all__ = ["Completion", "Generator", "ImageSettings"]
