"""The training engine: distributed setup, FSDP2, the loop, checkpoints, export.

Imports are lazy so `import xtune.engine` stays cheap for the CLI.
"""


def train(spec, work_dir=None, **inject):
    from xtune.engine.trainer import train as _train

    return _train(spec, work_dir, **inject)


def run(spec, work_dir) -> int:
    from xtune.engine.launch import run as _run

    return _run(spec, work_dir)


__all__ = ["run", "train"]
