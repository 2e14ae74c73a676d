"""Everything a user can fix, checked before any process group exists or any model is built: the model and
tokenizer folders, the adapters' targets, the datasets, wandb, the checkpoint to resume and what may change
since it was written, and the tokenizer against the model's vocabulary."""

from __future__ import annotations

from pathlib import Path

from xtune import peft as xpeft
from xtune.checkpoint.dcp import read_marker, read_state, resolve_resume
from xtune.checkpoint.resume_config import compare, refusal
from xtune.config.schema import RunSpec
from xtune.config.validate import peft_problems
from xtune.engine.metrics import check_wandb
from xtune.errors import CheckpointError, ConfigError, DataError
from xtune.models.tokenizer_check import load_checked_tokenizer


def check_resume_config(spec: RunSpec, ckpt: Path | None):
    """Changes against the checkpoint's own spec; ConfigError (exit 2) for keys that cannot change."""
    if ckpt is None:
        return None
    saved = read_state(ckpt, read_marker(ckpt)).get("spec")
    if saved is None:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: its state.json holds no run spec")
    changes = compare(saved, spec)
    if changes.refused:
        raise ConfigError(refusal(ckpt, changes))
    return changes


def preflight(spec: RunSpec, adapter, run_dir: Path):
    """Everything a user can fix, checked before any process group exists. Returns the tokenizer."""
    problems = adapter.validate()
    if xpeft.enabled(spec.peft) and not problems:
        problems = peft_problems(spec) or xpeft.check_targets(adapter, spec)
    if spec.model.load_from and not Path(spec.model.load_from).expanduser().is_dir() and not problems:
        problems.append(f"model.load_from: {spec.model.load_from} does not exist")
    if problems:
        raise ConfigError(problems)
    for ds in list(spec.data.datasets) + list(spec.data.eval_datasets):
        if not ds.path.startswith("hf://") and not Path(ds.path).expanduser().exists():
            raise DataError(f"dataset {ds.name}: {ds.path} does not exist")
    check_wandb(spec.logging)
    # A bad resume path, a partial checkpoint or a key that cannot change on resume fails here.
    check_resume_config(spec, resolve_resume(spec.train.resume, run_dir))
    tokenizer = load_checked_tokenizer(adapter)
    return tokenizer
