"""Rank 0's view of the run: metrics.jsonl, TensorBoard, wandb, and a progress bar or log lines.

Other ranks get a logger that does nothing, so the trainer never branches on the rank to log.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

from xtune.errors import XtuneError


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def truncate_history(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that died after its last checkpoint).

    A resumed run starts again at the checkpoint's step, so keeping them would duplicate steps.
    """
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if int(rec.get("step", 0)) <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def check_wandb(logging_spec) -> None:
    if logging_spec.wandb:
        try:  # lazy: wandb is optional and heavy
            import wandb  # noqa: F401
        except ImportError:
            raise XtuneError("logging.wandb=true but wandb is not installed: pip install wandb "
                             "(or set logging.wandb=false)") from None


class MetricsLogger:
    def __init__(self, logging_spec, run_dir: Path, total_steps: int, start_step: int, spec_dict: dict | None = None,
                 stream=None):
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.stream = stream or sys.stdout
        # Line-buffered and open for the whole run (closed in close()): every record is on disk at once.
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self.tb = None
        if logging_spec.tensorboard:
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.wandb = None
        if logging_spec.wandb:
            check_wandb(logging_spec)
            import wandb  # lazy: optional and heavy (checked just above)

            self.wandb = wandb.init(project=logging_spec.wandb_project, dir=str(self.run_dir),
                                    name=self.run_dir.name, config=spec_dict, resume="allow")
        mode = logging_spec.progress
        use_rich = mode == "rich" or (mode == "auto" and self.stream.isatty())
        self.progress = None
        if use_rich:
            self.progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                TextColumn("ETA"), TimeRemainingColumn(), refresh_per_second=4,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()
        self.t0 = time.time()
        self.start_step = start_step

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                # eval task metrics are already eval/<task>/<metric>; the others get their section
                tag = k if k.startswith("eval/") else ("eval/" if k.startswith("eval") else "train/") + k
                self.tb.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if "loss" in record:
            self._show_train(record)
        else:
            self.message("  ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def _show_train(self, r: dict) -> None:
        info = (f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  gnorm {r['grad_norm']:.3f}  "
                f"{r['tokens_per_s']:.0f} tok/s  mem {r.get('memory_gb', 0):.1f}G")
        if "rewards/accuracies" in r:  # preference runs: TRL's reward accuracy and margin
            info += f"  acc {r['rewards/accuracies']:.2f}  margin {r['rewards/margins']:.3f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=r["step"], info=info)
        else:
            done = r["step"] - self.start_step
            elapsed = time.time() - self.t0
            eta = elapsed / max(1, done) * (self.total - r["step"])
            self.message(f"step {r['step']}/{self.total}  {info}  eta {_hms(eta)}"
                         + ("  [skipped: non-finite grad norm]" if r.get("skipped") else ""))

    def text(self, tag: str, text: str, step: int) -> None:
        """A text entry (samples) in TensorBoard."""
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
            self.tb.flush()

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
