"""What a run writes besides checkpoints: the HF export (merged, and the PEFT folder of an adapter run), the saved
random-init base of an adapter run, samples from the export, and the summary a user reads at the end."""

from __future__ import annotations

import shutil
from pathlib import Path

from xtune import peft as xpeft
from xtune.checkpoint.hf_export import gather_full_state_dict, prune_step_exports, write_hf, write_peft
from xtune.engine.samples import generate_samples
from xtune.errors import XtuneError


def export_hf(tr, out_dir: Path | None = None) -> Path:
    """The HF folder (merged with the adapters when there are some and peft.merge_on_export), and with
    adapters the PEFT folder <run_dir>/hf_adapter (periodic exports: hf/step-N, hf_adapter/step-N).
    Collective. Returns the folder samples are generated from."""
    out = Path(out_dir or tr.run_dir / "hf")
    full = gather_full_state_dict(tr.model)
    error = None
    if tr.denv.is_main:
        try:
            out = _write_export(tr, full, out)
        except Exception as e:  # noqa: BLE001 - every rank must stop the same way
            error = f"{type(e).__name__}: {e}"
    error = tr.denv.broadcast_object(error)
    if error:
        raise XtuneError(f"exporting the model to {out} failed: {error}")
    return out


def _write_export(tr, full: dict, out: Path) -> Path:
    hf_root, keep = tr.run_dir / "hf", tr.spec.train.keep_last
    if tr.peft:
        adapter_dir = tr.run_dir / "hf_adapter" / out.relative_to(hf_root) \
            if out.is_relative_to(hf_root) else out.with_name(out.name + "_adapter")
        spec = xpeft.with_saved_base(tr.spec, tr.run_dir)
        merged = out if tr.spec.peft.merge_on_export else None
        write_peft(tr.adapter, spec, tr.lora_config, full, tr.model_config, tr.tokenizer,
                   adapter_dir=adapter_dir, merged_dir=merged, dtype=tr.compute_dtype)
        if adapter_dir.parent == tr.run_dir / "hf_adapter":
            prune_step_exports(adapter_dir.parent, keep)
        out = merged or adapter_dir
    else:
        write_hf(tr.adapter, full, tr.model_config, tr.tokenizer, out)
    if out.parent == hf_root:  # a periodic hf/step-N export
        prune_step_exports(out.parent, keep)
    return out


def save_random_base(tr, model, config) -> None:
    """A random-init base cannot be reloaded: write it once, as a HF folder <run_dir>/base that resume and
    export load like model.load_from (and that hf_adapter's base_model_name_or_path names). Collective."""
    base = xpeft.saved_base_dir(tr.run_dir)
    full = gather_full_state_dict(model)
    if tr.denv.is_main:
        write_hf(tr.adapter, xpeft.base_state(full), config, tr.tokenizer, base)
    tr.denv.barrier()


def samples_from(tr, hf_dir: Path) -> list:
    """Greedy completions of train.sample_prompts by the exported model at `hf_dir` (rank 0 only)."""
    t = tr.spec.train
    return generate_samples(tr.adapter, tr.tokenizer, hf_dir, t.sample_prompts, t.sample_max_new_tokens,
                            tr.step, tr.run_dir / "samples.jsonl", tr.logger.message, tr.logger.text)


def live_samples(tr) -> None:
    """Samples from the model as it is now (train.sample_every). Collective: every rank gathers the full weights
    into a temporary export (merged with the adapters, in the family's layout: export_hf), then rank 0 builds
    a plain model from it and generates, the same path as the end-of-run samples."""
    tmp = tr.run_dir / ".samples-hf"
    try:
        hf_dir = export_hf(tr, tmp)
        if tr.denv.is_main:
            samples_from(tr, hf_dir)
    finally:
        if tr.denv.is_main:
            for d in (tmp, tmp.with_name(".samples-hf_adapter")):
                shutil.rmtree(d, ignore_errors=True)
    tr.denv.barrier()


def summarize(tr, result: dict) -> None:
    """The last lines a user reads: how training went and where its results are."""
    loss = f"loss {result['loss']:.4f}" if "loss" in result else "no loss logged"
    evl = f", eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""
    tr.logger.message(
        f"done: {result['step']} steps, {loss}{evl}, {result['tokens_seen']} tokens"
        + (f", {result['skipped_steps']} skipped steps" if result["skipped_steps"] else "")
    )
    tr.logger.message(f"checkpoint: {result['checkpoint']}")
    tr.logger.message(f"export:     {result['hf_dir']}  (transformers from_pretrained loads it)")
    tr.logger.message(f"metrics:    {tr.run_dir / 'metrics.jsonl'}")
