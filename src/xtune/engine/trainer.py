"""The training loop: micro-steps with global loss normalisation, clipping, the optimizer step (engine/optim.py),
logging, eval, checkpoints, HF export, graceful stop on SIGTERM/SIGINT.

`train(spec, work_dir, method=)` is the entry point for Python callers and for each launched worker.
`Trainer` takes optional `adapter`, `loader`, `eval_batches` and `tokenizer` so tests can drive it
with hand-made batches; by default they come from the models and data stages. What runs before it
(`preflight`), how it resumes (`resume`) and what it writes besides checkpoints (`outputs`) live beside it.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch

from xtune import peft as xpeft
from xtune.checkpoint.dcp import Checkpointer, resolve_resume
from xtune.config.io import spec_to_dict
from xtune.data import build_eval_batches
from xtune.data.types import PackedBatch
from xtune.engine import outputs, resume, step
from xtune.engine.eval_hook import EvalTasksHook
from xtune.engine.metrics import MetricsLogger, NullLogger, memory_gb, truncate_history
from xtune.engine.optim import build_optimizer, build_scheduler, io_param_ids
from xtune.engine.preflight import preflight
from xtune.errors import CheckpointSaveError, ConfigError
from xtune.launch.env import launch_env
from xtune.launch.rundir import write_run_files
from xtune.launch.runlock import lock_run_dir
from xtune.models import get_adapter
from xtune.ops.loss import resolve_loss_mode
from xtune.parallel import attention
from xtune.parallel.distributed import DistEnv, init_distributed
from xtune.parallel.fsdp import build_sharded, param_dtype
from xtune.parallel.ulysses import SeqParallel

log = logging.getLogger("xtune.engine")

__all__ = ["Trainer", "train"]


class Trainer:
    def __init__(self, spec, run_dir, *, method, adapter=None, tokenizer=None, loader=None, eval_batches=None,
                 denv: DistEnv | None = None):
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.adapter = adapter if adapter is not None else get_adapter(spec.model)
        self.tokenizer = tokenizer
        self.method = method  # what sft and dpo do differently (the loss and its preparation): methods.Method
        self.denv = d = denv or init_distributed(spec.parallel)
        self.grad_accum = spec.train.global_batch_size // (d.dp_size * spec.train.micro_batch_size)
        self.device = d.device
        self.peft = xpeft.enabled(spec.peft)
        # Data first: a bad record or image stops the run before any model is built.
        # the method's step source (the data stage's loader; grpo's rollouts)
        self.loader = loader if loader is not None else method.train_loader(spec, tokenizer, d)
        if eval_batches is None and spec.data.eval_datasets:
            eval_batches = build_eval_batches(spec, tokenizer, dp_rank=d.dp_rank, dp_size=d.dp_size)
        self.eval_batches = eval_batches or []
        self._build_model()
        self._build_optimizer()
        # With adapters a checkpoint holds only what trains; the frozen base is reloaded from load_from.
        t = spec.train
        async_save = t.async_save if t.async_save is not None else d.device.type == "cuda"
        self.checkpointer = Checkpointer(self.run_dir, d, t.keep_last, trainable_only=self.peft, async_save=async_save)
        self.step = self.bad_streak = self.skipped_steps = self.tokens_seen = 0
        self.stop_requested = False
        self.last_saved = None
        self.eval_metrics: dict = {}

    def _build_model(self) -> None:
        """The sharded model with the method's loss module as its FSDP root."""
        spec, d, adapter = self.spec, self.denv, self.adapter
        attn_impl = attention.resolve(spec.parallel.attn, d.device)
        loss_mode = resolve_loss_mode(spec.loss.mode, d.device)
        # (the adapter's spec: a resumed random-init adapter run reloads the base it saved)
        save_base = self._save_random_base if self.peft and not adapter.spec.load_from else None

        def make_root(model, forward_impl):
            return self.method.root(model, adapter, forward_impl, loss_mode)

        self.root, self.model_config, self.lora_config = build_sharded(adapter, spec, d, attn_impl, make_root,
                                                                       on_base_ready=save_base)
        self.model = self.root.model
        if d.sp_size > 1:
            self.root.sp = SeqParallel(d.sp_size, d.sp_rank, d.sp_group)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_counts = xpeft.parameter_counts(self.model)

    def _build_optimizer(self) -> None:
        spec, d = self.spec, self.denv
        self.optimizer = build_optimizer([(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
                                         spec.optim, d.device, io_param_ids(self.model))
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, spec.sched, self.total_steps)
        # fp16 compute: dynamic loss scaling (inf/nan found on any rank skips the step on all of them).
        self.scaler = step.make_scaler(d) if self.compute_dtype == torch.float16 else None
        self.overflow_steps = 0
        # This spec's optimizer settings, which a resume with a changed optim/sched section re-applies.
        self.fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

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
        """Accumulate the gradients of the global-batch loss: `step.forward_backward`."""
        return step.forward_backward(self, micro_batches)

    def grad_norm(self) -> float:
        """Clip to optim.max_grad_norm and return the global norm before clipping: `step.grad_norm`."""
        return step.grad_norm(self)

    def optimizer_step(self) -> tuple:
        """Clip, step (or skip a non-finite step), zero the gradients: `step.optimizer_step`."""
        return step.optimizer_step(self)

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
        return resume.extra_state(self)

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
        return resume.restore(self, ckpt)

    def export_hf(self, out_dir: Path | None = None) -> Path:
        """The HF export (and the PEFT folder of an adapter run): `outputs.export_hf`."""
        return outputs.export_hf(self, out_dir)

    @property
    def compute_dtype(self) -> torch.dtype:
        return param_dtype(self.spec.parallel, self.device)

    def _save_random_base(self, model, config) -> None:
        outputs.save_random_base(self, model, config)

    # ------------------------------------------------------------------------------------- the loop

    def _on_signal(self, signum, frame):
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_requested = True

    def fit(self) -> dict:
        ckpt = resolve_resume(self.spec.train.resume, self.run_dir)
        self.method.prepare(self)  # with the initial weights (a resumed run reads what it stored)
        notes = self.resume(ckpt) if ckpt is not None else []
        self.logger = self._open_logger(ckpt, notes)
        self.eval_hook = EvalTasksHook(self.spec, self.run_dir)  # train.eval_tasks on the live model (engine/eval_hook.py)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            result = {"run_dir": str(self.run_dir), "stopped_early": False}
            self._loop(result)
            self._finish(result)
            return result
        finally:
            self._close_checkpointer()
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.logger.close()

    def _open_logger(self, ckpt: Path | None, notes: list):
        """Rank 0's metrics logger (the others log nothing); the run dir holds the whole history, so a resumed
        run's metrics restart at its checkpoint's step."""
        spec = self.spec
        if not self.denv.is_main:
            return NullLogger()
        truncate_history(self.run_dir / "metrics.jsonl", self.step)
        logger = MetricsLogger(spec.logging, self.run_dir, self.total_steps, self.step, spec_to_dict(spec))
        logger.message(xpeft.describe(*self.param_counts))
        if ckpt is not None:
            logger.message(f"resumed from {ckpt} at step {self.step}")
            for line in notes:
                logger.message(line)
        return logger

    def _eval_and_log(self, at_step: int) -> float:
        eval_loss = self.evaluate()
        self.logger.log({"step": at_step, "eval_loss": eval_loss, **self.eval_metrics})
        return eval_loss

    def _loop(self, result: dict) -> None:
        """The steps until total_steps, the data's end or a stop request; leaves `loss`, `eval_loss` and
        `stopped_early` in `result`."""
        t, d = self.spec.train, self.denv
        if self.step == 0 and self.eval_batches and t.eval_every:
            # The untrained model's eval loss: the reference every later eval is read against.
            result["eval_loss"] = self._eval_and_log(0)
        while self.step < self.total_steps:
            try:
                micro = next(self.loader)
            except StopIteration:
                break
            rec = self.train_step(micro)
            result["loss"] = rec["loss"]
            # Any rank may have been signalled: all of them stop after the same step.
            stop = not d.all_ok(not self.stop_requested)
            done = self.step >= self.total_steps
            if self.step % max(1, t.log_every) == 0 or done or stop:
                self.logger.log(rec)
            if self.eval_batches and ((t.eval_every and self.step % t.eval_every == 0) or done):
                result["eval_loss"] = self._eval_and_log(self.step)
            if self.eval_hook.due(self.step, done) and not stop:
                self.eval_hook.run(self)
            if t.sample_every and t.sample_prompts and self.step % t.sample_every == 0 and not done and not stop:
                self.live_samples()
            if (t.save_every and self.step % t.save_every == 0) or stop:
                self.save()
            if t.hf_every and self.step % t.hf_every == 0 and not done:
                self.export_hf(self.run_dir / "hf" / f"step-{self.step}")
            if stop:
                result["stopped_early"] = True
                return

    def _finish(self, result: dict) -> None:
        """The final checkpoint, export, samples and summary (after a stop request: the checkpoint only)."""
        t, d = self.spec.train, self.denv
        if not result["stopped_early"] and self.last_saved != self.step:
            self.save()
        # An async save in flight (the one of a stop, the final one) completes, marker and `latest` included,
        # before anything reports it or exports.
        self.checkpointer.wait()
        if result["stopped_early"]:
            self.logger.message(f"stop requested: saved checkpoint at step {self.step}, exiting")
        else:
            result["hf_dir"] = str(self.export_hf())
            if t.sample_prompts and d.is_main:
                result["samples"] = self.generate_samples(Path(result["hf_dir"]))
        result.update(step=self.step, skipped_steps=self.skipped_steps, tokens_seen=self.tokens_seen,
                      checkpoint=str(self.run_dir / "checkpoints" / f"step-{self.last_saved}"))
        if d.is_main and not result["stopped_early"]:
            self.summarize(result)

    def _close_checkpointer(self) -> None:
        """On every way out of fit (an error too) a save in flight finishes or fails cleanly: no checkpoint is left
        half written with its writer gone. Its failure is logged when another error is already on its way."""
        try:
            self.checkpointer.close()
        except CheckpointSaveError as e:
            log.error("%s", e)

    def summarize(self, result: dict) -> None:
        outputs.summarize(self, result)

    def generate_samples(self, hf_dir: Path) -> list:
        """Greedy completions of train.sample_prompts by the exported model (rank 0 only)."""
        return outputs.samples_from(self, hf_dir)

    def live_samples(self) -> None:
        """Samples from the model as it is now (train.sample_every): `outputs.live_samples`. Collective."""
        outputs.live_samples(self)

    def close(self) -> None:
        self.denv.close()


def train(spec, work_dir=None, argv=None, *, method, **inject) -> dict:
    """Train `spec` with `method` (a `methods.Method`) in this process (one rank of a launch, or a whole
    single-process run). `argv` (the command line as typed) goes to the run dir's cmd.txt."""
    run_dir = Path(work_dir or spec.train.work_dir or ".").expanduser().resolve()
    adapter = inject.pop("adapter", None)
    if adapter is None:
        adapter = get_adapter(spec.model)
    tokenizer = inject.pop("tokenizer", None)
    if tokenizer is None:
        tokenizer = preflight(spec, adapter, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    if launch_env().rank == 0:
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
