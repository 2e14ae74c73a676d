"""Training methods: what differs between `xtune sft` and `xtune dpo` (and the next ones: KTO, GRPO, ...).

A method gives the engine four things and the engine does the rest (loop, normalisation, checkpoints,
export): the FSDP root module that computes the loss numerator in its forward, each micro-batch's share of
the global normaliser, the metrics its numerator statistics become, and any preparation before the first
step (the preference method's reference log-probs). See `base.Method`.
"""

from xtune.config.schema import RunSpec
from xtune.engine.trainer import train as engine_train
from xtune.methods.base import Method
from xtune.methods.grpo import GrpoMethod
from xtune.methods.preference import PreferenceMethod
from xtune.methods.sft import SftMethod


def get_method(spec: RunSpec) -> Method:
    if spec.method == "grpo":
        return GrpoMethod(spec)
    if spec.method == "dpo":
        return PreferenceMethod(spec)
    return SftMethod(spec)


def train(spec: RunSpec, work_dir=None, argv=None, **inject) -> dict:
    """Train `spec` in this process with the method its `method` key names (the engine's entry for a spec)."""
    return engine_train(spec, work_dir, argv, method=get_method(spec), **inject)


__all__ = ["Method", "get_method", "train"]
