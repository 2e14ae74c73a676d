"""What the CLI commands do: compose and validate the config once, then hand the RunSpec on.

A training command composes every job with Hydra's compose API and validates it before anything starts,
so a configuration mistake costs seconds, not a queued Slurm job. A single job then runs here; a sweep
(-m) goes to Hydra's own main, which creates the sweep's run directories and runs the jobs through its
launcher plugins.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as _HydraCallback
from omegaconf import OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from xtune.config.compose import compose_jobs, hydra_overrides, primary_config, recipe_files, to_spec, without_hydra
from xtune.config.io import to_frozen
from xtune.config.resources import conf_dir
from xtune.config.schema import GenSpec, RunSpec
from xtune.config.validate import plan
from xtune.config.validate_gen import gen_problems
from xtune.errors import ConfigError, XtuneError
from xtune.gate import gate
from xtune.launch.env import launch_env
from xtune.runs import find_runs, read_status, summarize, write_status


def _console(stderr: bool = False):
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- training commands


def train_command(command: str, overrides: list[str], *, multirun: bool, cfg: str | None, dry_run: bool,
                  config_dirs: list[str]) -> int:
    """`xtune <command> overrides...` for a training command (sft, dpo, grpo): the command names the primary
    config, everything else is shared."""
    if cfg:
        if cfg not in ("job", "hydra", "all"):
            raise ConfigError([f"--cfg {cfg}: choose one of job, hydra, all"])
        return _print_cfg(gate(command, overrides, config_dirs, multirun=multirun, stage="compose").jobs, cfg)

    # A dry run and a sweep's points stop at validation: a sweep's jobs load their tokenizer where they run.
    stage = "validate" if dry_run or multirun else "load"
    jobs = gate(command, list(overrides) + _launch_overrides(overrides), config_dirs, multirun=multirun,
                stage=stage).jobs
    if dry_run:
        return _print_plan(jobs)
    if multirun:
        return _hydra_multirun(command, overrides, config_dirs)
    spec = jobs[0].spec
    run_dir = Path(spec.train.work_dir).expanduser().resolve()
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, work_dir=str(run_dir)))
    return _run_job(spec, run_dir)


def _launch_overrides(overrides: Sequence[str]) -> list[str]:
    """Under an external launcher every rank composes; make them agree on one run directory."""
    run_id = launch_env().run_id
    if run_id is not None and not any(o.startswith("train.work_dir=") for o in overrides):
        return [f"train.work_dir=work_dirs/${{recipe}}/run-{run_id}"]
    return []


def _print_cfg(jobs, which: str) -> int:
    """Hydra's --cfg: the job's config, its hydra node, or both (unresolved, as Hydra prints them)."""
    for job in jobs:
        cfg = job.cfg
        if which == "job":
            cfg = without_hydra(cfg)
        elif which == "hydra":
            cfg = OmegaConf.create({"hydra": cfg.hydra})
        else:
            cfg = cfg.copy()
            with open_dict(cfg):
                cfg.hydra.pop("runtime", None)  # paths of this process, not configuration
        sys.stdout.write(OmegaConf.to_yaml(cfg))
    return 0


def _print_plan(jobs) -> int:
    out = _console()
    for job in jobs:
        if len(jobs) > 1:
            out.print(f"[bold]job[/] {' '.join(a for a in job.overrides if not a.startswith('hydra.searchpath'))}")
        for key, value in plan(job.spec).items():
            out.print(f"  [cyan]{key}[/]: {value}")
    out.print(f"[green]ok[/]: {len(jobs)} job(s) valid; nothing was built (--dry-run)")
    return 0


def _run_job(spec: RunSpec, run_dir: Path) -> int:
    """One job: the engine trains it here (or spawns its workers). User errors propagate as XtuneError."""
    # lazy: torch and the engine load when a run starts, not for `xtune config`, --dry-run or a configuration error
    from xtune.launch.launcher import run
    from xtune.launch.rundir import user_argv
    if launch_env().rank == 0:
        try:
            _log_to(run_dir)
        except OSError as e:  # the first write to the run dir: read-only, no permission, a file in the way
            raise XtuneError(f"train.work_dir={run_dir}: cannot write there ({e.strerror}: {e.filename}); "
                             "choose a writable folder") from None
    return run(spec, run_dir, argv=user_argv())


def _log_to(run_dir: Path) -> None:
    """Console and run-dir log file (xtune.log), in the format Hydra's job logging used."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "xtune.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _hydra_multirun(command: str, overrides: Sequence[str], config_dirs: Sequence[str]) -> int:
    """A sweep: Hydra owns the process (run dirs, launcher plugins). Every point was validated already.
    The jobs may run in other processes or on other machines (joblib, submitit): the summary and the exit
    code are read back from the sweep directory, which `SweepDirRecord` reports from inside Hydra.

    Private reach-in, kept here only (checked on hydra-core 1.3.8): Hydra has no public multirun entry but
    `hydra.main`, which reads its arguments from sys.argv; the public compose API composes one job and runs
    no launcher. Rewriting sys.argv for `hydra.main` would also change what the jobs see (a job run in this
    process writes sys.argv to its run dir's cmd.txt), so `_run_hydra`, which `hydra.main` calls with the
    parsed arguments, is called directly.
    """
    from hydra._internal.utils import _run_hydra, get_args_parser

    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "sweep_dir"
        callback = "+hydra.callbacks.xtune_sweep_dir"
        parser = get_args_parser()
        args = parser.parse_args(["-m", *hydra_overrides(overrides, config_dirs),
                                  f"{callback}._target_={__name__}.SweepDirRecord", f"{callback}.record={record}"])
        _run_hydra(args=args, args_parser=parser, task_function=sweep_job, config_path=str(conf_dir()),
                   config_name=primary_config(command))
        sweep_dir = Path(record.read_text()) if record.is_file() else None
    try:
        job_dirs = find_runs([sweep_dir]) if sweep_dir is not None else []
    except XtuneError:  # no job got as far as its run directory
        job_dirs = []
    if not job_dirs:
        _console(stderr=True).print(f"[bold red]no job of the sweep left a run directory[/] in {sweep_dir}")
        return 1
    _sweep_summary(job_dirs)
    # A job with no status never finished (killed, or its process died with the launcher).
    failed = [d for d in job_dirs if read_status(d) != 0]
    return 1 if failed else 0


class SweepDirRecord(_HydraCallback):
    """Hydra callback, in the process that runs the sweep: writes the resolved sweep directory (its
    `${now:...}` is resolved once, there) to the file `record`, for the summary at the end."""

    def __init__(self, record: str):
        self.record = Path(record)

    def on_multirun_start(self, config, **kwargs) -> None:
        self.record.write_text(str(Path(str(config.hydra.sweep.dir)).resolve()))


def _sweep_summary(job_dirs: list[Path]) -> None:
    """The comparison table of the sweep's points, printed and written to <sweep dir>/summary.{csv,json}."""
    sweep_dir = job_dirs[0].parent
    try:
        summarize(job_dirs, _console(), out_dir=sweep_dir if all(j.parent == sweep_dir for j in job_dirs) else None,
                  title=f"sweep {sweep_dir}")
    except (OSError, ValueError) as e:  # a summary problem never turns a good sweep into a failed one
        _console(stderr=True).print(f"[yellow]could not summarise the sweep[/]: {e}")
    else:
        _console().print(f"summary: {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.json'}")


def sweep_job(cfg) -> tuple:
    """One job of a sweep, run by Hydra's launcher: its run dir is Hydra's output dir. A failed job is
    reported in one line and the sweep goes on; returns (exit code, run dir), the code also in status.json."""
    code, work_dir = _sweep_job(cfg)
    write_status(work_dir, code)
    return code, work_dir


def _sweep_job(cfg) -> tuple:
    work_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = cfg.copy()
        OmegaConf.update(cfg, "train.work_dir", str(work_dir))
        # lazy: torch and the engine load when a job starts (this module is imported by every command)
        from xtune.launch.launcher import run
        from xtune.launch.rundir import user_argv

        code = run(to_spec(cfg, validate=False), work_dir, argv=user_argv())
    except XtuneError as e:
        _console(stderr=True).print(f"[bold red]job failed[/] ({work_dir}): {e}")
        return e.exit_code, work_dir
    if code:
        _console(stderr=True).print(f"[bold red]job failed[/] ({work_dir}): workers exited with {code}")
    return code, work_dir


# --------------------------------------------------------------------------- other commands


def eval_command(path: Path, overrides: list[str], *, out: Path | None, multirun: bool, dry_run: bool,
                 config_dirs: list[str]) -> int:
    """`xtune eval PATH overrides...`: every job composed and validated before the model is loaded."""
    from xtune.eval.command import run_eval  # lazy: the eval runner imports torch and transformers

    return run_eval(path, overrides, out=out, multirun=multirun, dry_run=dry_run, config_dirs=config_dirs,
                    console=_console())


def recipes_table(config_dirs: list[str]) -> None:
    table = Table(title="xtune recipes", show_lines=False)
    for col in ("recipe", "model", "data", "description"):
        table.add_column(col)
    for name, path in recipe_files(config_dirs).items():
        node = OmegaConf.load(path)
        chosen = {}
        for entry in node.get("defaults", []) or []:
            if isinstance(entry, str):
                continue
            for k, v in entry.items():
                chosen[str(k).replace("override", "").strip().lstrip("/")] = v
        table.add_row(name, str(chosen.get("model", "-")), str(chosen.get("data", "-")), str(node.get("description", "")))
    _console().print(table)


def show_config(overrides: list[str], config_dirs: list[str]) -> None:
    cfg = gate(None, overrides, config_dirs, stage="compose").cfg  # composed only: what an invalid run would get
    sys.stdout.write(OmegaConf.to_yaml(cfg, resolve=True))


def inspect_data(overrides: list[str], config_dirs: list[str]) -> None:
    from xtune.data.inspect import inspect_data as inspect  # lazy: the data stage imports torch
    admitted = gate(None, overrides, config_dirs, stage="load")
    inspect(admitted.spec, admitted.tokenizer, _console())



# --------------------------------------------------------------------------- chat


def compose_gen(overrides: Sequence[str], config_dirs: Sequence[str] = ()):
    """The `gen` group composed with Hydra like every group (gen=NAME, gen.KEY=VALUE) and validated: a GenSpec."""
    others = [o for o in overrides if not o.lstrip("+~").partition("=")[0].split(".")[0] == "gen"]
    if others:
        raise ConfigError([f"{o}: only generation settings are taken here (gen.KEY=VALUE, e.g. gen.temperature=0.7, "
                           "or gen=NAME)" for o in others])
    cfg = without_hydra(compose_jobs("sft", list(overrides), config_dirs, validate=False)[0].cfg)
    spec = to_frozen(GenSpec, cfg.gen)
    problems = gen_problems(spec)
    if problems:
        raise ConfigError(problems)
    return spec


def chat_command(path: Path, overrides: list[str], *, prompt: str | None, image: Path | None,
                 system: str | None, flags: dict, device: str, trust_remote_code: bool,
                 config_dirs: list[str]) -> int:
    """`xtune chat PATH [gen.KEY=VALUE ...]`: flags (--max-new-tokens, --temperature) are gen overrides too."""
    from xtune.generate.chat import run_chat  # lazy: the generation engine imports torch and transformers

    extra = [f"gen.{k}={v}" for k, v in flags.items() if v is not None]
    gen = compose_gen(list(overrides) + extra, config_dirs)
    if image is not None and not image.is_file():
        raise XtuneError(f"--image {image}: no such file")
    return run_chat(str(path), gen, prompt=prompt, image=str(image.resolve()) if image else None, system=system,
                    device=device, trust_remote_code=trust_remote_code)
