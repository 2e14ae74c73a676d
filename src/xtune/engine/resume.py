"""What a checkpoint holds besides the DCP shards (the run's global state, JSON) and how a trainer takes it
back: the counters, the loader position, the LR schedule, the loss scale, and, when the spec changed since the
checkpoint, the optimizer settings and the LR schedule of the new spec."""

from __future__ import annotations

from pathlib import Path

from xtune.checkpoint.dcp import read_marker
from xtune.config.io import spec_to_dict
from xtune.engine.optim import build_scheduler
from xtune.engine.preflight import check_resume_config


def describe_layout(layout: dict) -> str:
    n = layout["world_size"]
    text = f"{n} rank{'s' if n != 1 else ''}"
    if layout.get("replicate_degree", 1) > 1:
        rep = layout["replicate_degree"]
        text += f" (HSDP {rep} replicas x {n // rep} shards)"
    if layout.get("sp_size", 1) > 1:
        text += f" (sequence parallel {layout['sp_size']}: {n // layout['sp_size']} data-parallel groups)"
    if "grad_accum" in layout:
        text += (f" x {layout['grad_accum']} micro-batches of {layout['micro_batch_size']} rows"
                 f" = global batch {layout['global_batch_size']}")
    return text


def extra_state(tr) -> dict:
    """The run's global state (JSON): nothing in it depends on the number of ranks or their layout."""
    return {
        "scaler": tr.scaler.state_dict() if tr.scaler is not None else None,
        "scheduler": tr.scheduler.state_dict(),
        "loader": tr.loader.state_dict(),
        "counters": {"step": tr.step, "bad_streak": tr.bad_streak, "skipped_steps": tr.skipped_steps,
                     "tokens_seen": tr.tokens_seen, "overflow_steps": tr.overflow_steps},
        "spec": spec_to_dict(tr.spec),
    }


def restore(tr, ckpt: Path) -> list:
    """Load `ckpt` (written on any number of ranks) into the trainer `tr`; returns the lines that say what
    changed."""
    changes = check_resume_config(tr.spec, ckpt)
    meta = read_marker(ckpt)
    saved = meta["layout"] or {"world_size": meta["world_size"]}  # a save given no layout
    extra = tr.checkpointer.load(ckpt, tr.model, tr.optimizer)
    tr.scheduler.load_state_dict(extra["scheduler"])
    if tr.scaler is not None and extra["scaler"]:
        tr.scaler.load_state_dict(extra["scaler"])
    tr.loader.load_state_dict(extra["loader"])
    c = extra["counters"]
    tr.step, tr.bad_streak = c["step"], c["bad_streak"]
    tr.skipped_steps, tr.tokens_seen, tr.overflow_steps = c["skipped_steps"], c["tokens_seen"], c["overflow_steps"]
    tr.last_saved = tr.step
    notes = [f"layout: saved by {describe_layout(saved)}; now {describe_layout(tr.layout())}"]
    if changes and changes.lines:
        notes += ["changed since the checkpoint:"] + [f"  {line}" for line in changes.lines]
        if changes.schedule or changes.optim:
            notes.append(apply_new_schedule(tr))
    return notes


def apply_new_schedule(tr) -> str:
    """The optimizer settings of this spec replace the checkpoint's (the moments are kept), and the LR continues
    on the schedule built for this spec's peak and total, from the current step: a new scheduler whose last
    step is the one before it (torch sets each group's LR for the current step when it is built)."""
    for group, fresh in zip(tr.optimizer.param_groups, tr.fresh_groups):
        group.update({k: v for k, v in fresh.items() if k != "lr"})  # initial_lr: this spec's peak
    tr.scheduler = build_scheduler(tr.optimizer, tr.spec.sched, tr.total_steps, last_step=tr.step - 1)
    lr = tr.optimizer.param_groups[0]["lr"]
    return (f"schedule rebuilt: {tr.spec.sched.type} with peak lr {tr.scheduler.base_lrs[0]:g} over "
            f"{tr.total_steps} steps; step {tr.step + 1} uses lr {lr:.6g}")
