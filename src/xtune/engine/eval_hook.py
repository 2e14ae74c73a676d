"""Eval tasks during training (`train.eval_tasks`, `train.eval_tasks_every`) and the best checkpoint by one of their
metrics (`train.keep_best=<task>/<metric>`).

The tasks run on the live model (a Generator over the training module, no export written): every rank generates
its share of the prompts. Their metrics go to metrics.jsonl, TensorBoard and W&B as `eval/<task>/<metric>` (with
`eval_tasks_seconds`, the time they took) through the run's logger, and `<run_dir>/eval/<task>/` holds the latest
samples and summary. With keep_best, a new best saves a checkpoint at that step (unless one was just saved), keeps
it as `checkpoints/best` (hard links to the step's files: never pruned by keep_last, never picked by resume) with
`checkpoints/best.json`, and exports it to `<run_dir>/hf_best`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from xtune.config.eval_tasks import load_task
from xtune.config.schema import RunSpec
from xtune.eval.runner import evaluate_task, print_results, write_result
from xtune.generate import Generator

BEST = "best"
BEST_JSON = "best.json"


class EvalTasksHook:
    def __init__(self, spec: RunSpec, run_dir: Path):
        t = spec.train
        self.tasks = [load_task(name, spec.gen) for name in t.eval_tasks]
        self.every = t.eval_tasks_every
        self.keep_best = t.keep_best
        self.run_dir = Path(run_dir)
        self.best = _read_best(self.run_dir)
        self.seconds = 0.0

    def due(self, step: int, done: bool) -> bool:
        return bool(self.tasks) and (done or (self.every > 0 and step % self.every == 0))

    def run(self, trainer) -> dict:
        """Every task on the live model (collective); logs and returns {eval/<task>/<metric>: value}."""
        t0 = time.perf_counter()
        # The FSDP root itself: the Generator switches it to inference for each call and back (generate/live.py).
        generator = Generator(trainer.root, trainer.tokenizer, device=trainer.device, template=trainer.spec.data.template,
                              family=trainer.spec.model.family)
        flat, results = {}, []
        for espec, gen in self.tasks:
            result = evaluate_task(generator, espec, gen)
            if trainer.denv.is_main:
                write_result(result, self.run_dir, espec, gen, model=str(self.run_dir), step=trainer.step)
            flat.update(result.flat())
            results.append(result)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        trainer.logger.log({"step": trainer.step, **flat, "eval_tasks_seconds": round(seconds, 3)})
        if trainer.step >= trainer.total_steps:  # the end of the run: the table, as `xtune eval` prints it
            trainer.logger.message(table_text(results, f"eval at step {trainer.step} ({self.run_dir / 'eval'})"))
        if self.keep_best:
            self._keep_best(trainer, flat)
        return flat

    def _keep_best(self, trainer, flat: dict) -> None:
        value = flat.get(f"eval/{self.keep_best}")
        if value is None or (self.best is not None and value <= self.best["value"]):
            return
        if trainer.last_saved != trainer.step:
            trainer.save()
        trainer.checkpointer.wait()
        self.best = {"step": trainer.step, "metric": self.keep_best, "value": value}
        if trainer.denv.is_main:
            _link_best(self.run_dir / "checkpoints", trainer.step, self.best)
        trainer.denv.barrier()
        trainer.export_hf(self.run_dir / "hf_best")
        trainer.logger.message(f"best {self.keep_best} {value:.4f} at step {trainer.step}: checkpoints/best, hf_best/")


def table_text(results, title: str) -> str:
    console = Console(file=io.StringIO(), width=100, highlight=False)
    print_results(results, console, title=title)
    return console.file.getvalue().rstrip()


def _read_best(run_dir: Path) -> dict | None:
    path = run_dir / "checkpoints" / BEST_JSON
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _link_best(root: Path, step: int, best: dict) -> None:
    """checkpoints/best := hard links to checkpoints/step-N's files (copies where links are refused), swapped in
    whole by a rename; then best.json."""
    src = root / f"step-{step}"
    tmp = root / f".tmp-{BEST}"
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link)
    old = root / f".old-{BEST}"
    shutil.rmtree(old, ignore_errors=True)
    if (root / BEST).exists():
        os.replace(root / BEST, old)
    os.replace(tmp, root / BEST)
    shutil.rmtree(old, ignore_errors=True)
    (root / BEST_JSON).write_text(json.dumps(best) + "\n")
