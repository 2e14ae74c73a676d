"""The run directory's own files, written in this one place: config.yaml (the resolved spec: export, resume
and the spawned workers read it), cmd.txt (the command line) and env.json (versions)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

import xtune
from xtune.checkpoint.dcp import read_marker, resolve_resume
from xtune.config.io import spec_to_yaml
from xtune.config.schema import RunSpec


def write_run_files(spec: RunSpec, run_dir: Path, argv: Sequence[str] | None = None) -> Path:
    """config.yaml, or on a resume config.step-N.yaml (N: the step it resumes from; config.yaml keeps the first
    run's spec, so no launch's config is lost); with `argv`, cmd.txt and env.json. Returns the config written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_dir / "config.yaml"
    step = _resume_step(spec, run_dir) if cfg.exists() else None
    if step is not None:
        cfg = run_dir / f"config.step-{step}.yaml"
    tmp = cfg.with_name(f".{cfg.name}.tmp")  # atomic: a reader never sees half a file
    tmp.write_text(spec_to_yaml(spec))
    os.replace(tmp, cfg)
    if argv is not None:
        (run_dir / "cmd.txt").write_text(f"cd {shlex.quote(os.getcwd())} && {shlex.join(argv)}\n")
        (run_dir / "env.json").write_text(json.dumps(environment(), indent=2) + "\n")
    return cfg


def _resume_step(spec: RunSpec, run_dir: Path) -> int | None:
    ckpt = resolve_resume(spec.train.resume, run_dir)
    return None if ckpt is None else read_marker(ckpt)["step"]


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "xtune": xtune.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    for name in ("liger_kernel", "flash_attn"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except Exception:
            env[name] = None
    return env


def user_argv() -> list:
    """The command line as typed: `xtune ...` (also under `python -m xtune` and torchrun's `-m xtune`)."""
    return ["xtune"] + sys.argv[1:]
