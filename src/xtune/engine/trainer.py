"""The training loop: micro-steps with global loss normalisation, clipping, AdamW, logging, eval,
checkpoints, HF export, graceful stop on SIGTERM/SIGINT.

`train(spec, work_dir)` is the entry point for Python callers and for each launched worker.
`Trainer` takes optional `adapter`, `loader`, `eval_batches` and `tokenizer` so tests can drive it
with hand-made batches; by default they come from the models and data stages.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from xtune.data.types import PackedBatch
from xtune.config.io import spec_to_dict
from xtune.checkpoint.dcp import Checkpointer, resolve_resume
from xtune.parallel.distributed import DistEnv, init_distributed
from xtune.engine.metrics import MetricsLogger, NullLogger, check_wandb, memory_gb, truncate_history
from xtune.engine.optim import build_optimizer, build_scheduler, io_param_ids
from xtune.parallel.fsdp import build_sharded
from xtune.launch.rundir import write_run_files
from xtune.parallel import attention
from xtune.errors import CheckpointSaveError, ConfigError, DataError, XtuneError
from xtune import peft as xpeft
from xtune.launch.env import launch_env
from xtune.models.tokenizer_check import load_checked_tokenizer

log = logging.getLogger("xtune.engine")


# ----------------------------------------------------------------------------------------- preflight


def check_resume_config(spec, ckpt: Path | None):
    """Changes against the checkpoint's own spec; ConfigError (exit 2) for keys that cannot change."""
    from xtune.checkpoint.dcp import read_marker, read_state
    from xtune.checkpoint.resume_config import compare, refusal

    if ckpt is None:
        return None
    meta = read_marker(ckpt)
    saved = read_state(ckpt, meta).get("spec") if "files" in meta else None
    if saved is None:  # an older checkpoint: it did not keep its spec
        return None
    changes = compare(saved, spec)
    if changes.refused:
        raise ConfigError(refusal(ckpt, changes))
    return changes


def preflight(spec, adapter, run_dir: Path):
    """Everything a user can fix, checked before any process group exists. Returns the tokenizer."""
    problems = adapter.validate()
    if xpeft.enabled(spec.peft) and not problems:
        from xtune.config.validate import peft_problems

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


def derived_seed(seed: int, step: int, index: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0])


# ----------------------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, spec, run_dir, *, method, adapter=None, tokenizer=None, loader=None, eval_batches=None,
                 denv: DistEnv | None = None):
        from xtune.ops.loss import resolve_loss_mode

        self.spec = spec
        self.run_dir = Path(run_dir)
        if adapter is None:
            from xtune.models import get_adapter

            adapter = get_adapter(spec.model)
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.denv = denv or init_distributed(spec.parallel)
        d = self.denv
        t = spec.train
        self.grad_accum = t.global_batch_size // (d.dp_size * t.micro_batch_size)
        self.device = d.device
        attn_impl = attention.resolve(spec.parallel.attn, d.device)
        loss_mode = resolve_loss_mode(spec.loss.mode, d.device)
        # Data first: a bad record or image stops the run before any model is built.
        if loader is None:
            from xtune.data import build_train_loader

            loader = build_train_loader(spec, tokenizer, dp_rank=d.dp_rank, dp_size=d.dp_size, rank=d.rank)
        self.loader = loader
        if eval_batches is None and spec.data.eval_datasets:
            from xtune.data import build_eval_batches

            eval_batches = build_eval_batches(spec, tokenizer, dp_rank=d.dp_rank, dp_size=d.dp_size)
        self.eval_batches = eval_batches or []
        self.peft = xpeft.enabled(spec.peft)
        self.method = method  # what sft and dpo do differently (the loss and its preparation): methods.Method
        # (the adapter's spec: a resumed random-init adapter run reloads the base it saved)
        save_base = self._save_random_base if self.peft and not adapter.spec.load_from else None

        def make_root(model, forward_impl):
            return self.method.root(model, adapter, forward_impl, loss_mode)

        self.root, self.model_config, self.lora_config = build_sharded(adapter, spec, d, attn_impl, make_root,
                                                                       on_base_ready=save_base)
        self.model = self.root.model
        if d.sp_size > 1:
            from xtune.parallel.ulysses import SeqParallel

            self.root.sp = SeqParallel(d.sp_size, d.sp_rank, d.sp_group)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_counts = xpeft.parameter_counts(self.model)
        self.optimizer = build_optimizer([(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
                                         spec.optim, d.device, io_param_ids(self.model))
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, spec.sched, self.total_steps)
        # fp16 compute: dynamic loss scaling (inf/nan found on any rank skips the step on all of them).
        self.scaler = make_scaler(d) if self.compute_dtype == torch.float16 else None
        self.overflow_steps = 0
        # This spec's optimizer settings, which a resume with a changed optim/sched section re-applies.
        self.fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        # With adapters a checkpoint holds only what trains; the frozen base is reloaded from load_from.
        async_save = t.async_save if t.async_save is not None else d.device.type == "cuda"
        self.checkpointer = Checkpointer(self.run_dir, d, t.keep_last, trainable_only=self.peft, async_save=async_save)
        self.step = 0
        self.bad_streak = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.stop_requested = False
        self.last_saved = None
        self.eval_metrics: dict = {}

    def _total_steps(self) -> int:
        t = self.spec.train
        total = getattr(self.loader, "total_steps", None)
        if total is None:
            per_epoch = getattr(self.loader, "steps_per_epoch", None)
            if t.max_steps:
                total = t.max_steps
            elif per_epoch:
                total = math.ceil((t.epochs or 1) * per_epoch)
            else:
                raise ConfigError(["set train.max_steps: the data loader does not know its length"])
        if t.max_steps:
            total = min(total, t.max_steps)
        return int(total)

    # ------------------------------------------------------------------------------------- one step

    def forward_backward(self, micro_batches: list[PackedBatch]) -> dict:
        """Accumulate the gradients of the global-batch loss; returns global loss and counts.

        Each micro-batch contributes sum(w_i CE_i) / W with W summed over the whole global batch
        (one all_reduce before the micro-steps), so any split of the batch gives the same loss.
        FSDP averages gradients over all ranks; multiplying by world_size turns that into the sum. Under
        sequence parallelism each rank's loss covers its piece of the rows its SP group shares, so the sums over
        all ranks stay those of the global batch; the counts are taken once per SP group.
        """
        d = self.denv
        once = 1 if d.sp_rank == 0 else 0
        local = [once * sum(self.method.normaliser(mb) for mb in micro_batches),
                 once * sum(mb.num_tokens for mb in micro_batches),
                 once * sum(mb.num_trained for mb in micro_batches)]
        w_total, n_tokens, n_trained = d.all_reduce_sum(local).tolist()
        w_total = w_total if w_total > 0 else 1.0  # no trained token anywhere: zero loss, zero grads
        n_micro = len(micro_batches)
        # Accumulated on the device: no host sync per micro-batch, one all_reduce per step.
        acc = torch.zeros(2 + len(self.method.stat_names), dtype=torch.float64, device=self.device)
        first = d.dp_rank * n_micro  # this rank's first micro-batch in the global batch
        for j, mb in enumerate(micro_batches):
            # Randomness (dropout) is a function of (seed, step, micro-batch): nothing to checkpoint, and
            # the same on any number of ranks that splits the global batch into the same micro-batches.
            torch.manual_seed(derived_seed(self.spec.train.seed, self.step, first + j))
            loss_sum, aux, stats = self.method.forward(self.root, mb.to(self.device))
            if stats is not None:
                acc[2:] += stats.detach().double()
            loss = loss_sum.float() / w_total
            objective = loss * d.world_size
            if aux is not None:
                # aux is a per-micro-batch mean: average it over micro-batches (and, via FSDP, ranks).
                objective = objective + aux.float() / n_micro
                acc[1] += aux.detach().double()
            (self.scaler.scale(objective) if self.scaler is not None else objective).backward()
            acc[0] += loss.detach().double()
        acc = acc.to(d.comm_device)
        torch.distributed.all_reduce(acc)
        loss, aux_sum, *stats = acc.tolist()
        return {"loss": loss, "aux_loss": aux_sum / (n_micro * d.world_size), "tokens": int(n_tokens),
                "trained_tokens": int(n_trained), "method": self.method.metrics(stats, w_total)}

    def grad_norm(self) -> float:
        """Clip to optim.max_grad_norm (<= 0: no clipping) and return the global norm before clipping.

        With FSDP2 the gradients are DTensor shards; clip_grad_norm_ reduces their norms across the
        mesh and returns a (replicated) DTensor.
        """
        max_norm = self.spec.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def optimizer_step(self) -> tuple:
        if self.scaler is not None:
            return self.scaled_optimizer_step()
        gnorm = self.grad_norm()
        skipped = not math.isfinite(gnorm)
        if skipped:
            # Never let inf/nan reach the weights or Adam's moments: drop this step's gradients.
            self.skipped_steps += 1
            self.bad_streak += 1
            self._too_many_bad_steps()
        else:
            self.optimizer.step()
            self.bad_streak = 0
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm, skipped

    def _too_many_bad_steps(self) -> None:
        if self.bad_streak >= self.spec.train.max_bad_steps:
            raise XtuneError(
                f"{self.bad_streak} steps in a row had a non-finite gradient norm (last at step {self.step + 1}); "
                "stopping. Lower optim.lr, check the data, or resume from an earlier checkpoint "
                f"(train.max_bad_steps={self.spec.train.max_bad_steps})")

    def scaled_optimizer_step(self) -> tuple:
        """fp16: unscale (all ranks agree on inf/nan), clip, step unless it overflowed, update the scale.

        An overflow is the scaler's normal way of finding its scale: it is skipped and counted
        (overflow_steps) but only counts towards train.max_bad_steps once the scale has fallen below 1,
        where the gradients themselves are non-finite."""
        self.scaler.unscale_(self.optimizer)
        gnorm = self.grad_norm()
        skipped = not math.isfinite(gnorm)
        self.step_scale = float(self.scaler.get_scale())
        # Our own step rather than scaler.step: that one hands found_inf to fused AdamW, whose CPU kernel
        # rejects its shape (torch 2.13); unscale_ already recorded found_inf for update().
        if not skipped:
            self.optimizer.step()
        self.scaler.update()
        if skipped:
            self.skipped_steps += 1
            self.overflow_steps += 1
            self.bad_streak = self.bad_streak + 1 if self.step_scale < 1.0 else 0
            self._too_many_bad_steps()
        else:
            self.bad_streak = 0
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm, skipped

    def train_step(self, micro_batches: list[PackedBatch]) -> dict:
        t0 = time.perf_counter()
        if len(micro_batches) != self.grad_accum and self.step == 0:
            log.warning("the loader gave %d micro-batches for a step, expected %d", len(micro_batches), self.grad_accum)
        stats = self.forward_backward(micro_batches)
        gnorm, skipped = self.optimizer_step()
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += stats["tokens"]
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": stats["loss"], "lr": lr, "grad_norm": gnorm,
               "tokens_per_s": stats["tokens"] / dt, "trained_tokens_per_s": stats["trained_tokens"] / dt,
               "tokens_seen": self.tokens_seen, "step_time_s": dt, "memory_gb": memory_gb(self.device)}
        rec.update(stats["method"])
        if stats["aux_loss"]:
            rec["aux_loss"] = stats["aux_loss"]
        if self.scaler is not None:
            rec["loss_scale"] = self.step_scale  # the scale this step's backward used
            rec["overflow_steps"] = self.overflow_steps
        if skipped:
            rec["skipped"] = True
            rec["skipped_steps"] = self.skipped_steps
        return rec

    @torch.no_grad()
    def evaluate(self) -> float:
        """Eval loss with the same packing and normalisation as training (every rank has the same count).
        The method's eval statistics (`eval_` + their names) are left in `self.eval_metrics`."""
        d = self.denv
        n = len(self.method.stat_names)
        local = torch.zeros(2 + n, dtype=torch.float64)
        local[0] = sum(self.method.normaliser(mb) for mb in self.eval_batches) if d.sp_rank == 0 else 0.0
        for mb in self.eval_batches:
            loss_sum, _, stats = self.method.forward(self.root, mb.to(self.device), split="eval")
            local[1] += float(loss_sum)
            if stats is not None:
                local[2:] += stats.double().cpu()
        if hasattr(self.root, "reshard"):  # FSDP root: free the parameters kept unsharded by eval
            self.root.reshard()
        w_total, total, *stats = d.all_reduce_sum(local.tolist()).tolist()
        self.eval_metrics = {f"eval_{k}": v for k, v in self.method.metrics(stats, w_total).items()}
        return total / w_total if w_total > 0 else float("nan")

    # ------------------------------------------------------------------------------------- state

    def extra_state(self) -> dict:
        """The run's global state (JSON): nothing in it depends on the number of ranks or their layout."""
        return {
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "counters": {"step": self.step, "bad_streak": self.bad_streak, "skipped_steps": self.skipped_steps,
                         "tokens_seen": self.tokens_seen, "overflow_steps": self.overflow_steps},
            "spec": spec_to_dict(self.spec),
        }

    def layout(self) -> dict:
        d, t = self.denv, self.spec.train
        return {"world_size": d.world_size, "dp_size": d.dp_size, "replicate_degree": self.spec.parallel.replicate_degree,
                "sp_size": d.sp_size,
                "micro_batch_size": t.micro_batch_size, "grad_accum": self.grad_accum,
                "global_batch_size": t.global_batch_size}

    def save(self) -> Path:
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.extra_state(), self.layout())
        self.last_saved = self.step
        return path

    def resume(self, ckpt: Path) -> list:
        """Load `ckpt` (written on any number of ranks); returns the lines that say what changed."""
        from xtune.checkpoint.dcp import read_marker

        changes = check_resume_config(self.spec, ckpt)
        meta = read_marker(ckpt)
        saved = meta.get("layout") or {"world_size": meta["world_size"]}
        extra = self.checkpointer.load(ckpt, self.model, self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        self.loader.load_state_dict(extra["loader"])
        c = extra["counters"]
        self.step, self.bad_streak = c["step"], c["bad_streak"]
        self.skipped_steps, self.tokens_seen = c["skipped_steps"], c["tokens_seen"]
        self.overflow_steps = c.get("overflow_steps", 0)
        self.last_saved = self.step
        notes = [f"layout: saved by {describe_layout(saved)}; now {describe_layout(self.layout())}"]
        if changes and changes.lines:
            notes += ["changed since the checkpoint:"] + [f"  {line}" for line in changes.lines]
            if changes.schedule or changes.optim:
                notes.append(self.apply_new_schedule())
        return notes

    def apply_new_schedule(self) -> str:
        """The optimizer settings of this spec replace the checkpoint's, and the LR continues on the
        schedule rebuilt for this spec's total from the current step (the moments are kept)."""
        sch = self.scheduler
        for group, fresh in zip(self.optimizer.param_groups, self.fresh_groups):
            group.update({k: v for k, v in fresh.items() if k != "lr"})
        sch.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
            group["lr"] = base * factor(self.step)
        sch._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # torch 2.13: what get_last_lr() reads
        lr = self.optimizer.param_groups[0]["lr"]
        return (f"schedule rebuilt: {self.spec.sched.type} with peak lr {sch.base_lrs[0]:g} over {self.total_steps} "
                f"steps; step {self.step + 1} uses lr {lr:.6g}")

    def export_hf(self, out_dir: Path | None = None) -> Path:
        """The HF folder (merged with the adapters when there are some and peft.merge_on_export), and with
        adapters the PEFT folder <run_dir>/hf_adapter (periodic exports: hf/step-N, hf_adapter/step-N).
        Returns the folder samples are generated from."""
        from xtune.checkpoint.hf_export import gather_full_state_dict, prune_step_exports, write_hf, write_peft

        out = Path(out_dir or self.run_dir / "hf")
        full = gather_full_state_dict(self.model)
        error = None
        if self.denv.is_main:
            try:
                if self.peft:
                    adapter_dir = self.run_dir / "hf_adapter" / out.relative_to(self.run_dir / "hf") \
                        if out.is_relative_to(self.run_dir / "hf") else out.with_name(out.name + "_adapter")
                    spec = xpeft.with_saved_base(self.spec, self.run_dir)
                    merged = out if self.spec.peft.merge_on_export else None
                    write_peft(self.adapter, spec, self.lora_config, full, self.model_config, self.tokenizer,
                               adapter_dir=adapter_dir, merged_dir=merged, dtype=self.compute_dtype)
                    if adapter_dir.parent == self.run_dir / "hf_adapter":
                        prune_step_exports(adapter_dir.parent, self.spec.train.keep_last)
                    out = merged or adapter_dir
                else:
                    write_hf(self.adapter, full, self.model_config, self.tokenizer, out)
                if out.parent == self.run_dir / "hf":  # a periodic hf/step-N export
                    prune_step_exports(out.parent, self.spec.train.keep_last)
            except Exception as e:  # noqa: BLE001
                error = f"{type(e).__name__}: {e}"
        error = self.denv.broadcast_object(error)
        if error:
            raise XtuneError(f"exporting the model to {out} failed: {error}")
        return out

    @property
    def compute_dtype(self) -> torch.dtype:
        from xtune.parallel.fsdp import param_dtype

        return param_dtype(self.spec.parallel, self.device)

    def _save_random_base(self, model, config) -> None:
        """A random-init base cannot be reloaded: write it once, as a HF folder <run_dir>/base that resume and
        export load like model.load_from (and that hf_adapter's base_model_name_or_path names)."""
        from xtune.checkpoint.hf_export import gather_full_state_dict, write_hf

        base = xpeft.saved_base_dir(self.run_dir)
        full = gather_full_state_dict(model)
        if self.denv.is_main:
            write_hf(self.adapter, xpeft.base_state(full), config, self.tokenizer, base)
        self.denv.barrier()

    # ------------------------------------------------------------------------------------- the loop

    def _on_signal(self, signum, frame):
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_requested = True

    def fit(self) -> dict:
        spec, t, d = self.spec, self.spec.train, self.denv
        ckpt = resolve_resume(t.resume, self.run_dir)
        self.method.prepare(self)  # with the initial weights (a resumed run reads what it stored)
        resume_notes = self.resume(ckpt) if ckpt is not None else []
        metrics_path = self.run_dir / "metrics.jsonl"
        if d.is_main:
            # The run dir holds the whole history; a resumed run restarts at its checkpoint's step.
            truncate_history(metrics_path, self.step)
            logger = MetricsLogger(spec.logging, self.run_dir, self.total_steps, self.step, spec_to_dict(spec))
            logger.message(xpeft.describe(*self.param_counts))
            if ckpt is not None:
                logger.message(f"resumed from {ckpt} at step {self.step}")
                for line in resume_notes:
                    logger.message(line)
        else:
            logger = NullLogger()
        self.logger = logger
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        result = {"run_dir": str(self.run_dir), "stopped_early": False}
        try:
            last = None
            eval_loss = None
            if self.step == 0 and self.eval_batches and t.eval_every:
                # The untrained model's eval loss: the reference every later eval is read against.
                eval_loss = self.evaluate()
                logger.log({"step": 0, "eval_loss": eval_loss, **self.eval_metrics})
            while self.step < self.total_steps:
                try:
                    micro = next(self.loader)
                except StopIteration:
                    break
                rec = self.train_step(micro)
                last = rec
                # Any rank may have been signalled: all of them stop after the same step.
                stop = not d.all_ok(not self.stop_requested)
                done = self.step >= self.total_steps
                if self.step % max(1, t.log_every) == 0 or done or stop:
                    logger.log(rec)
                if self.eval_batches and ((t.eval_every and self.step % t.eval_every == 0) or done):
                    eval_loss = self.evaluate()
                    logger.log({"step": self.step, "eval_loss": eval_loss, **self.eval_metrics})
                if t.sample_every and t.sample_prompts and self.step % t.sample_every == 0 and not done and not stop:
                    self.live_samples()
                if (t.save_every and self.step % t.save_every == 0) or stop:
                    self.save()
                if t.hf_every and self.step % t.hf_every == 0 and not done:
                    self.export_hf(self.run_dir / "hf" / f"step-{self.step}")
                if stop:
                    result["stopped_early"] = True
                    break
            if not result["stopped_early"] and self.last_saved != self.step:
                self.save()
            # An async save in flight (the one of a stop, the final one) completes, marker and `latest` included,
            # before anything reports it or exports.
            self.checkpointer.wait()
            if result["stopped_early"]:
                logger.message(f"stop requested: saved checkpoint at step {self.step}, exiting")
            else:
                result["hf_dir"] = str(self.export_hf())
                if t.sample_prompts and d.is_main:
                    result["samples"] = self.generate_samples(Path(result["hf_dir"]))
            result.update(step=self.step, skipped_steps=self.skipped_steps, tokens_seen=self.tokens_seen,
                          checkpoint=str(self.run_dir / "checkpoints" / f"step-{self.last_saved}"))
            if last is not None:
                result["loss"] = last["loss"]
            if eval_loss is not None:
                result["eval_loss"] = eval_loss
            if d.is_main and not result["stopped_early"]:
                self.summarize(result)
            return result
        finally:
            self._close_checkpointer()
            for sig, h in handlers.items():
                signal.signal(sig, h)
            logger.close()

    def _close_checkpointer(self) -> None:
        """On every way out of fit (an error too) a save in flight finishes or fails cleanly: no checkpoint is left
        half written with its writer gone. Its failure is logged when another error is already on its way."""
        try:
            self.checkpointer.close()
        except CheckpointSaveError as e:
            log.error("%s", e)

    def summarize(self, result: dict) -> None:
        """The last lines a user reads: how training went and where its results are."""
        loss = f"loss {result['loss']:.4f}" if "loss" in result else "no loss logged"
        evl = f", eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""
        self.logger.message(
            f"done: {result['step']} steps, {loss}{evl}, {result['tokens_seen']} tokens"
            + (f", {result['skipped_steps']} skipped steps" if result["skipped_steps"] else "")
        )
        self.logger.message(f"checkpoint: {result['checkpoint']}")
        self.logger.message(f"export:     {result['hf_dir']}  (transformers from_pretrained loads it)")
        self.logger.message(f"metrics:    {self.run_dir / 'metrics.jsonl'}")

    def generate_samples(self, hf_dir: Path) -> list:
        """Greedy completions of train.sample_prompts by the exported model (rank 0 only)."""
        from xtune.engine.samples import generate_samples

        t = self.spec.train
        return generate_samples(self.adapter, self.tokenizer, hf_dir, t.sample_prompts, t.sample_max_new_tokens,
                                self.step, self.run_dir / "samples.jsonl", self.logger.message, self.logger.text)

    def live_samples(self) -> None:
        """Samples from the model as it is now (train.sample_every). Collective: every rank gathers the full weights
        into a temporary export (merged with the adapters, in the family's layout: export_hf), then rank 0 builds
        a plain model from it and generates, the same path as the end-of-run samples."""
        import shutil

        tmp = self.run_dir / ".samples-hf"
        try:
            hf_dir = self.export_hf(tmp)
            if self.denv.is_main:
                self.generate_samples(hf_dir)
        finally:
            if self.denv.is_main:
                for d in (tmp, tmp.with_name(".samples-hf_adapter")):
                    shutil.rmtree(d, ignore_errors=True)
        self.denv.barrier()

    def close(self) -> None:
        self.denv.close()


def make_scaler(denv):
    """torch's ShardedGradScaler: works on FSDP2's DTensor gradient shards and all-reduces the inf/nan flag
    over the default group, so every rank skips the same steps."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device=denv.device.type)


def train(spec, work_dir=None, argv=None, *, method, **inject) -> dict:
    """Train `spec` with `method` (a `methods.Method`) in this process (one rank of a launch, or a whole
    single-process run). `argv` (the command line as typed) goes to the run dir's cmd.txt."""
    run_dir = Path(work_dir or spec.train.work_dir or ".").expanduser().resolve()
    adapter = inject.pop("adapter", None)
    if adapter is None:
        from xtune.models import get_adapter

        adapter = get_adapter(spec.model)
    tokenizer = inject.pop("tokenizer", None)
    if tokenizer is None:
        tokenizer = preflight(spec, adapter, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    if launch_env().rank == 0:
        from xtune.launch.runlock import lock_run_dir

        # One writer per run directory (exit 2 if another run holds it); None for the workers of a launcher
        # that holds it for them (and has written the run files).
        lock = lock_run_dir(run_dir)
        if lock is not None:
            write_run_files(spec, run_dir, argv)
    try:
        resume_from = resolve_resume(spec.train.resume, run_dir)
        if resume_from is not None:  # an adapter run from random init reloads the base it saved
            adapter.spec = xpeft.with_saved_base(spec, resume_from.resolve().parent.parent).model
        denv = inject.pop("denv", None) or init_distributed(spec.parallel)
        try:
            result = Trainer(spec, run_dir, method=method, adapter=adapter, tokenizer=tokenizer, denv=denv,
                             **inject).fit()
            # No rank tears the group down while another still talks to it (gloo aborts on a closed peer).
            denv.barrier()
            return result
        finally:
            denv.close()
    finally:
        if lock is not None:
            lock.release()
