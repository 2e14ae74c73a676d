"""The training engine: the loop, the optimizer and schedule, metrics. It runs the method object it is given
(`methods.Method`) and never imports `methods`; `xtune.methods.train` pairs a spec with its method.

Imports are lazy so `import xtune.engine` stays cheap for the CLI.
"""

from xtune.config.schema import RunSpec


def train(spec: RunSpec, work_dir=None, argv=None, *, method, **inject):
    from xtune.engine.trainer import train as _train

    return _train(spec, work_dir, argv, method=method, **inject)


__all__ = ["train"]
