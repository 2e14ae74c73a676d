"""What the CLI commands do: compose and validate the config, then hand the RunSpec on.

`sft` validates every point of a sweep before Hydra starts any job, so a configuration mistake
costs seconds, not a queued Slurm job. Hydra's own main then creates the run directories and
runs the jobs (its launcher plugins work unchanged).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from xtune.errors import ConfigError, XtuneError

_FAILED_JOBS: List[str] = []
# A user error of a single (non-multirun) job, re-raised after Hydra's main returns: raised inside the
# task function, Hydra would print it as a traceback and exit 1 instead of our message and exit code.
_JOB_ERRORS: List[XtuneError] = []
# The command line as the user typed it (sys.argv is rewritten for Hydra while jobs run).
_USER_ARGV: List[str] = []


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- launch environment


def external_launch() -> Optional[str]:
    """An id shared by all ranks when started by torchrun or Slurm with more than one process."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) <= 1:
        return None
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(var) and os.environ[var] != "none":
            return os.environ[var]
    return os.environ.get("MASTER_PORT", "run")


def global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _launch_overrides(overrides: Sequence[str]) -> List[str]:
    """Under an external launcher every rank composes; make them agree on one run directory."""
    run_id = external_launch()
    extra: List[str] = []
    if run_id is not None:
        if not any(o.startswith("train.work_dir=") for o in overrides):
            extra.append(f"train.work_dir=work_dirs/${{recipe}}/run-{run_id}")
        if global_rank() != 0:
            extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra


# --------------------------------------------------------------------------- sft


def sft(overrides: List[str], *, multirun: bool, cfg: Optional[str], dry_run: bool,
        config_dirs: List[str]) -> int:
    from xtune.config import compose as C
    from xtune.config.validate import plan

    C.setup(config_dirs)
    if cfg:
        if cfg not in ("job", "hydra", "all"):
            raise ConfigError([f"--cfg {cfg}: choose one of job, hydra, all"])
        problems = C.check_overrides(overrides, config_dirs)
        if problems:
            raise ConfigError(problems)
        return _hydra_main(C.hydra_overrides(overrides, config_dirs), ["--cfg", cfg] + (["-m"] if multirun else []))

    problems = C.check_overrides(overrides, config_dirs)
    parsed_sweeps = _sweep_keys(overrides)
    if parsed_sweeps and not multirun:
        problems.append(
            f"{', '.join(parsed_sweeps)}: several values given (a sweep); add -m/--multirun to run one job per value"
        )
    if problems:
        raise ConfigError(problems)

    points = C.sweep_points(overrides) if multirun else [list(overrides)]
    specs, problems = [], []
    for point in points:
        try:
            specs.append(C.to_spec(C.compose(point, config_dirs)))
        except ConfigError as e:
            prefix = f"[{' '.join(point)}] " if len(points) > 1 else ""
            problems.extend(prefix + p for p in e.problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))

    if dry_run:
        out = _console()
        for point, spec in zip(points, specs):
            if len(points) > 1:
                out.print(f"[bold]job[/] {' '.join(point)}")
            for key, value in plan(spec).items():
                out.print(f"  [cyan]{key}[/]: {value}")
        out.print(f"[green]ok[/]: {len(specs)} job(s) valid; nothing was built (--dry-run)")
        return 0

    args = C.hydra_overrides(list(overrides) + _launch_overrides(overrides), config_dirs)
    _FAILED_JOBS.clear()
    _JOB_ERRORS.clear()
    _USER_ARGV[:] = ["xtune"] + sys.argv[1:]
    code = _hydra_main(args, ["-m"] if multirun else [])
    if _JOB_ERRORS:
        raise _JOB_ERRORS.pop()
    if _FAILED_JOBS:
        return 1
    return code


def _sweep_keys(overrides: Sequence[str]) -> List[str]:
    from xtune.config.compose import _parse

    parsed, _ = _parse(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def _hydra_main(overrides: List[str], flags: List[str]) -> int:
    """Run Hydra's own main (run dirs, multirun, launchers, --cfg) with our task function."""
    import hydra

    from xtune.config.resources import conf_dir

    main = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="sft")(_task)
    saved = sys.argv
    sys.argv = ["xtune"] + flags + overrides
    try:
        main()
    finally:
        sys.argv = saved
    return 0


def _task(cfg) -> None:
    """One Hydra job: the resolved spec goes to the engine; the run dir is Hydra's output dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from xtune.config.compose import to_spec

    hc = HydraConfig.get()
    work_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        cfg = cfg.copy()
        OmegaConf.update(cfg, "train.work_dir", str(work_dir))
        spec = to_spec(cfg)
        if global_rank() == 0:
            write_run_files(spec, work_dir)
        from xtune.engine.launch import run

        code = run(spec, work_dir)
    except XtuneError as e:
        if not multirun:
            _JOB_ERRORS.append(e)
            return
        _FAILED_JOBS.append(str(work_dir))
        _console(stderr=True).print(f"[bold red]job failed[/] ({work_dir}): {e}")
        return
    if code:
        if not multirun:
            raise SystemExit(code)
        _FAILED_JOBS.append(str(work_dir))
        _console(stderr=True).print(f"[bold red]job failed[/] ({work_dir}): workers exited with {code}")


def write_run_files(spec, work_dir: Path) -> None:
    """config.yaml (the resolved spec), cmd.txt (the command line), env.json (versions)."""
    from xtune.config.io import spec_to_yaml

    work_dir.mkdir(parents=True, exist_ok=True)
    if not (spec.train.resume and (work_dir / "config.yaml").exists()):  # a resume keeps it (see write_config)
        (work_dir / "config.yaml").write_text(spec_to_yaml(spec))
    argv = _USER_ARGV or ["xtune"] + sys.argv[1:]
    (work_dir / "cmd.txt").write_text(f"cd {shlex.quote(os.getcwd())} && {shlex.join(argv)}\n")
    (work_dir / "env.json").write_text(json.dumps(environment(), indent=2) + "\n")


def environment() -> dict:
    import torch
    import transformers

    import xtune

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "xtune": xtune.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    for name in ("liger_kernel", "flash_attn"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except Exception:
            env[name] = None
    return env


# --------------------------------------------------------------------------- other commands


def recipes_table(config_dirs: List[str]) -> None:
    from omegaconf import OmegaConf
    from rich.table import Table

    from xtune.config.compose import recipe_files

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


def show_config(overrides: List[str], config_dirs: List[str]) -> None:
    from omegaconf import OmegaConf

    from xtune.config.compose import compose

    cfg = compose(overrides, config_dirs)
    sys.stdout.write(OmegaConf.to_yaml(cfg, resolve=True))


def inspect_data(overrides: List[str], config_dirs: List[str]) -> None:
    from xtune.config.compose import load_spec
    from xtune.data.inspect import inspect_data as inspect
    from xtune.models import get_adapter

    _, spec = load_spec(overrides, config_dirs)
    tokenizer = get_adapter(spec.model).load_tokenizer()
    inspect(spec, tokenizer, _console())

