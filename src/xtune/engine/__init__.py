"""The training engine: the loop, the optimizer and schedule, metrics. It runs the method object it is given
(`methods.Method`); the methods package is never a dependency of it: `xtune.methods.train` pairs a spec with its method."""

from xtune.engine.trainer import train

__all__ = ["train"]
