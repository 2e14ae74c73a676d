"""`xtune eval PATH`: compose and validate every job, load the model once, run each task, print the table.

A sweep (`-m eval=a,b gen.temperature=0,0.7`) is expanded and validated by the same Hydra override parsing as
`xtune sft -m`; its points run one after another in this process on the one loaded model (loading it once per
point would cost more than the points themselves). Points that share a task name get the sweep's values in their
output folder's name: `eval/demo[gen.temperature=0.7]/`.
Under torchrun (`torchrun --nproc-per-node N -m xtune eval ...`) every rank runs the tasks on its share of the
prompts; rank 0 writes and prints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from xtune.config.compose_eval import compose_eval_jobs
from xtune.errors import XtuneError
from xtune.eval.harness import run_harness
from xtune.eval.runner import evaluate_task, print_results, write_result
from xtune.generate import Generator
from xtune.launch.env import launch_env


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "hf").is_dir())


def out_dir_for(path: Path, out: Path | None) -> Path:
    """--out, else the run directory itself; a bare model folder needs --out (its folder is not ours to write)."""
    if out is not None:
        return Path(out).expanduser().resolve()
    if is_run_dir(path):
        return path.resolve()
    raise XtuneError(f"{path} is not a run directory (config.yaml + checkpoints/ or hf/): give --out DIR for the "
                     "results of a model folder")


def _sweep_names(jobs) -> list[str]:
    names = [j.spec.eval.name for j in jobs]
    common = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    out = []
    for job, name in zip(jobs, names):
        if names.count(name) > 1:  # the values this point was swept over
            point = [a for a in job.overrides if a not in common and not a.startswith(("hydra.", "eval="))]
            name = f"{name}[{','.join(point)}]" if point else name
        out.append(name.replace("/", "_"))
    if len(set(out)) < len(out):
        out = [f"{n}-{i}" for i, n in enumerate(out)]
    return out


def run_eval(path: Path, overrides: list[str], *, out: Path | None, multirun: bool, dry_run: bool,
             config_dirs: list[str], console) -> int:
    path = Path(path).expanduser()
    if not path.exists():
        raise XtuneError(f"{path}: no such run directory or model folder")
    jobs = compose_eval_jobs(overrides, config_dirs, multirun=multirun)
    out_dir = out_dir_for(path, out)
    names = _sweep_names(jobs)
    if dry_run:
        for job, name in zip(jobs, names):
            console.print(f"[bold]{name}[/]: {job.spec.eval.data.path} scorer={job.spec.eval.scorer} "
                          f"limit={job.spec.eval.limit} max_new_tokens={job.spec.gen.max_new_tokens} -> "
                          f"{out_dir / 'eval' / name}")
        console.print(f"[green]ok[/]: {len(jobs)} eval job(s) valid; nothing was loaded (--dry-run)")
        return 0
    # lm-eval loads the model itself: a harness-only run loads nothing here
    generator = load_generator(path) if any(j.spec.eval.data.path for j in jobs) else None
    main = launch_env().rank == 0
    results = []
    for job, name in zip(jobs, names):
        spec = job.spec
        if spec.eval.data.path is not None:
            espec = dataclasses.replace(spec.eval, name=name)
            result = evaluate_task(generator, espec, spec.gen)
            if main:
                write_result(result, out_dir, espec, spec.gen, model=str(path.resolve()))
            results.append(result)
        if spec.harness.tasks:
            results.extend(run_harness(path, spec.harness, out_dir, main=main, device=_device()))
    if main:
        print_results(results, console, title=f"eval {path}")
        console.print(f"results: {out_dir / 'eval'}")
    return 0


def load_generator(path: Path):
    """The Generator for a run directory, an export or an adapter folder (on CUDA when there is one)."""
    env = launch_env()
    cuda = torch.cuda.is_available()
    if env.launched and env.world_size > 1 and not dist.is_initialized():  # torchrun: the Generator shards over ranks
        if cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Generator.from_path(path, device=_device())


def _device() -> str:
    return f"cuda:{launch_env().local_rank}" if torch.cuda.is_available() else "cpu"
