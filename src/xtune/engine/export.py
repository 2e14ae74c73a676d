"""Hugging Face export: from the live sharded model (during a run) or from any checkpoint folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from xtune.errors import CheckpointError


def gather_full_state_dict(model: torch.nn.Module) -> dict:
    """Collective: the full (unsharded) weights, on CPU, on rank 0 only (other ranks get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_hf(adapter, full_state_dict: dict, config, tokenizer, out_dir: str | Path) -> Path:
    """Write via a sibling temp folder and swap it in, so `out_dir` is never half-written.

    The periodic exports `out_dir/step-N` (train.hf_every) that a previous version of `out_dir` holds are
    carried over into the new one: the final export replaces the model files, not the history.
    """
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapter.save_hf(full_state_dict, config, tokenizer, tmp)
    if out.exists():
        for _, sub in step_exports(out):
            os.rename(sub, tmp / sub.name)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out


def step_exports(hf_root: Path) -> list:
    """(step, folder) of the periodic exports `hf_root/step-N`, oldest first."""
    if not hf_root.is_dir():
        return []
    return sorted((int(p.name[5:]), p) for p in hf_root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit())


def prune_step_exports(hf_root: Path, keep_last: int) -> None:
    """train.keep_last applies to the periodic exports as to checkpoints (<= 0 keeps all)."""
    if keep_last > 0:
        for _, old in step_exports(hf_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, spec=None, adapter=None) -> Path:
    """Checkpoint folder (run_dir/checkpoints/step-N) -> HF folder, in this single process.

    The run's config.yaml (two levels up) says which model to build; the DCP shards are resharded
    into one unsharded model on CPU, whatever the number of ranks that wrote them.
    """
    from xtune.config.io import spec_from_yaml
    from xtune.engine.checkpoint import load_model_only, read_marker
    from xtune.models import get_adapter

    ckpt = Path(ckpt_dir)
    read_marker(ckpt)
    if spec is None:
        cfg = ckpt.resolve().parent.parent / "config.yaml"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg} not found: export needs the run's config.yaml two levels above {ckpt}")
        spec = spec_from_yaml(cfg)
    adapter = adapter or get_adapter(spec.model)
    model, config = build_plain_model(adapter, spec)
    load_model_only(ckpt, model)
    return write_hf(adapter, model.state_dict(), config, adapter.load_tokenizer(), out_dir)


def build_plain_model(adapter, spec, attn_impl: str | None = "sdpa"):
    """An unsharded model on CPU with only its buffers initialised (weights come from a checkpoint)."""
    from xtune.engine.parallelize import _DTYPES, _buffer_init

    config = adapter.build_config()
    with torch.device("meta"):
        model = adapter.build_model(config, attn_impl)
    model.to(dtype=_DTYPES[spec.model.dtype])
    model.to_empty(device="cpu")
    with torch.no_grad():
        init_buffers = _buffer_init(adapter)
        (init_buffers or adapter.init_weights)(model)
    return model, config
