"""Checks on eval tasks (the `eval` group, `train.eval_tasks`, `train.keep_best`), run before any model is loaded.

Each problem names the key, the value and what is allowed, as validate.py's do.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from xtune.config.eval_tasks import load_task
from xtune.config.schema import GenSpec, RunSpec
from xtune.config.schema_eval import EVAL_CHOICES, EvalRunSpec, EvalSpec
from xtune.config.validate_gen import gen_problems
from xtune.errors import ConfigError

BUILTIN_SCORERS = ("exact", "regex", "math", "choice")
NORMALIZE_OPTIONS = ("case", "whitespace", "punctuation")
# Named extraction patterns (eval.pattern); `boxed` is matched by hand (nested braces), the rest are regexes.
NAMED_PATTERNS = {
    "gsm8k": r"####\s*([-+]?[\d,]*\.?\d+)",
    "last_number": r"([-+]?\d[\d,]*\.?\d*|[-+]?\.\d+)(?!.*\d)",
}
BOXED = "boxed"


def pattern_problem(pattern: str | None) -> str | None:
    """Why eval.pattern cannot extract an answer (no regex, not a regex, no group), or None."""
    if pattern is None:
        return "eval.scorer=regex needs eval.pattern: gsm8k, boxed, last_number or a regex with one group"
    if pattern == BOXED:
        return None
    try:
        compiled = re.compile(NAMED_PATTERNS.get(pattern, pattern), re.DOTALL)
    except re.error as e:
        return f"eval.pattern={pattern}: not a valid regex ({e})"
    if compiled.groups < 1:
        return (f"eval.pattern={pattern}: the regex has no group; put the answer in ( ), e.g. 'answer is (\\d+)' "
                f"(or use gsm8k, boxed, last_number)")
    return None


def metric_names(espec: EvalSpec, gen: GenSpec) -> list[str]:
    """The metrics a task reports: accuracy (builtin scorers) or score (a user function), and pass@k for k > 1."""
    main = "score" if ":" in espec.scorer else "accuracy"
    return [main] + [f"pass@{k}" for k in espec.k if k > 1 and espec.scorer != "choice"]


def _scorer_problems(e: EvalSpec, gen: GenSpec, where: str) -> list[str]:
    out = []
    if ":" in e.scorer:
        module, _, fn = e.scorer.partition(":")
        if not module or not fn:
            out.append(f"{where}eval.scorer={e.scorer}: give module:function")
        if e.scorer_path is not None:
            folder = Path(e.scorer_path).expanduser()
            if not folder.is_dir():
                out.append(f"{where}eval.scorer_path={e.scorer_path}: no such folder")
            elif module and not ((folder / (module.replace(".", "/") + ".py")).is_file()
                                 or (folder / module.replace(".", "/") / "__init__.py").is_file()):
                out.append(f"{where}eval.scorer={e.scorer}: no {module.replace('.', '/')}.py in "
                           f"eval.scorer_path={e.scorer_path}")
    elif e.scorer not in BUILTIN_SCORERS:
        from xtune.config.validate import suggest  # lazy: a cycle (config.validate imports this module)

        out.append(f"{where}eval.scorer={e.scorer}: no such scorer; choose one of {', '.join(BUILTIN_SCORERS)} or "
                   f"module:function (with eval.scorer_path=DIR).{suggest(e.scorer, BUILTIN_SCORERS)}")
    if e.scorer == "regex":
        msg = pattern_problem(e.pattern)
        if msg:
            out.append(where + msg)
    bad = [o for o in e.normalize if o not in NORMALIZE_OPTIONS]
    if bad:
        out.append(f"{where}eval.normalize={list(e.normalize)}: {', '.join(bad)} not allowed; "
                   f"choose among {', '.join(NORMALIZE_OPTIONS)}")
    for k in e.k:
        if k < 1 or k > gen.n:
            out.append(f"{where}eval.k={list(e.k)}: pass@{k} needs 1 <= k <= gen.n={gen.n} samples per prompt")
    return out


def task_problems(e: EvalSpec, gen: GenSpec, *, check_files: bool = True, where: str = "") -> list[str]:
    """What is wrong with one eval task and its generation settings."""
    out = _scorer_problems(e, gen, where)
    for key, allowed in EVAL_CHOICES.items():
        value = e.data.format if key == "eval.data.format" else e.compare
        if value not in allowed:
            out.append(f"{where}{key}={value}: not allowed; choose one of {', '.join(allowed)}")
    if e.limit is not None and e.limit <= 0:
        out.append(f"{where}eval.limit={e.limit}: must be > 0 (or null for all records)")
    if e.tolerance < 0:
        out.append(f"{where}eval.tolerance={e.tolerance}: must be >= 0")
    if e.data.path is None:
        out.append(f"{where}eval.data.path is not set: give the task's records (eval=NAME or eval.data.path=FILE)")
    elif check_files and not e.data.path.startswith("hf://") and not Path(e.data.path).expanduser().exists():
        out.append(f"{where}eval.data.path={e.data.path}: no such file or folder")
    out.extend(where + p for p in gen_problems(gen))
    return out


def eval_run_problems(spec: EvalRunSpec, *, check_files: bool = True) -> list[str]:
    """`xtune eval`: the task (unless only harness tasks are asked for) and the harness section."""
    out = []
    harness_only = bool(spec.harness.tasks) and spec.eval.data.path is None
    if not harness_only:
        out.extend(task_problems(spec.eval, spec.gen, check_files=check_files))
    h = spec.harness
    if h.include_path is not None and check_files and not Path(h.include_path).expanduser().is_dir():
        out.append(f"harness.include_path={h.include_path}: no such folder")
    if h.limit is not None and h.limit <= 0:
        out.append(f"harness.limit={h.limit}: must be > 0 (or null)")
    if h.tasks:
        if importlib.util.find_spec("lm_eval") is None:
            out.append("harness.tasks needs lm-evaluation-harness: pip install 'xtune[harness]'")
    return out


def train_eval_problems(spec: RunSpec, *, check_files: bool = True) -> list[str]:
    """train.eval_tasks (each task loaded and checked), train.eval_tasks_every and train.keep_best."""
    t, out = spec.train, []
    if t.eval_tasks_every < 0:
        out.append(f"train.eval_tasks_every={t.eval_tasks_every}: must be >= 0 (0: only at the end)")
    if t.eval_tasks_every and not t.eval_tasks:
        out.append(f"train.eval_tasks_every={t.eval_tasks_every} but train.eval_tasks is empty")
    metrics = {}
    for i, name in enumerate(t.eval_tasks):
        where = f"train.eval_tasks[{i}] ({name}): "
        try:
            espec, gen = load_task(name, spec.gen)
        except ConfigError as e:
            out.extend(where + p for p in e.problems)
            continue
        if espec.name in metrics:
            out.append(f"{where}two tasks named {espec.name}: give one an eval.name of its own")
        metrics[espec.name] = metric_names(espec, gen)
        out.extend(task_problems(espec, gen, check_files=check_files, where=where))
    if t.keep_best is not None:
        task, _, metric = t.keep_best.partition("/")
        known = [f"{k}/{m}" for k, ms in metrics.items() for m in ms]
        if not t.eval_tasks:
            out.append(f"train.keep_best={t.keep_best}: needs train.eval_tasks (the task it reads)")
        elif task in metrics and metric not in metrics[task] or task not in metrics and metrics:
            out.append(f"train.keep_best={t.keep_best}: choose one of {', '.join(known)} (<task>/<metric>)")
    return out
