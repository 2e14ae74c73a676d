"""Comparing runs: the summary table of a sweep (also `xtune runs DIR...`) and `xtune plot`.

Everything is read back from the run directories (config.yaml, metrics.jsonl, status.json), so the table
printed at the end of a sweep and the one `xtune runs` prints later are the same. No torch import.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf
from rich.table import Table

from xtune.errors import XtuneError

STATUS_FILE = "status.json"
# Keys that differ between every run and say nothing about the configuration.
_IGNORED = ("train.work_dir",)
METRIC_COLUMNS = ("status", "final_loss", "best_eval_loss", "trained_tokens_per_s", "run_dir")


def write_status(run_dir: Path, exit_code: int) -> None:
    """A sweep job's exit code, read back by the summary (a failed job may have no metrics at all)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATUS_FILE).write_text(json.dumps({"exit_code": int(exit_code)}) + "\n")


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file() or (path / STATUS_FILE).is_file()


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories named directly, or found one level below a sweep directory (in job order)."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise XtuneError(f"{p}: no such run or sweep directory")
        if is_run(p):
            runs.append(p)
            continue
        found = sorted((c for c in p.iterdir() if c.is_dir() and is_run(c)),
                       key=lambda c: (not c.name.isdigit(), int(c.name) if c.name.isdigit() else 0, c.name))
        if not found:
            raise XtuneError(f"{p}: neither a run directory (config.yaml, metrics.jsonl) nor a sweep of them")
        runs.extend(found)
    return runs


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return out


def _flat(node, prefix="") -> dict[str, str]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, (list, dict)) else str(node)}


def _config(run_dir: Path) -> dict[str, str]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return _flat(OmegaConf.to_container(OmegaConf.load(path)))


def _overrides(run_dir: Path) -> dict[str, str] | None:
    """A sweep job's overrides as Hydra recorded them (.hydra/overrides.yaml); a job that failed before
    writing config.yaml still has them."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    return dict(str(o).split("=", 1) for o in OmegaConf.load(path) if "=" in str(o))


def varying_keys(configs: Sequence[dict[str, str]]) -> list[str]:
    present = [c for c in configs if c]  # a run that failed early may have no config at all
    keys = sorted({k for c in present for k in c})
    return [k for k in keys if k not in _IGNORED and len({c.get(k) for c in present}) > 1]


def read_status(run_dir: Path) -> int | None:
    """A sweep job's exit code from its status.json, None when it has none (not a sweep job, or unfinished)."""
    path = run_dir / STATUS_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text()).get("exit_code", 0))
    except (ValueError, AttributeError, TypeError):  # cut short by a kill
        return None


def status_of(run_dir: Path, records: list[dict]) -> str:
    code = read_status(run_dir)
    if code is not None:
        return "ok" if code == 0 else f"failed (exit {code})"
    return "ok" if (run_dir / "hf").is_dir() or (run_dir / "hf_adapter").is_dir() else "incomplete"


def eval_metrics(run_dir: Path, records: list[dict]) -> dict[str, float]:
    """{eval/<task>/<metric>: value} of a run: its eval/<task>/summary.json files (the final eval, or `xtune eval`
    on it), else the last value of each such key in metrics.jsonl (a run stopped before its end)."""
    out: dict[str, float] = {}
    for rec in records:
        out.update({k: v for k, v in rec.items() if k.startswith("eval/") and _finite(v)})
    root = run_dir / "eval"
    if root.is_dir():
        for f in sorted(root.glob("*/summary.json")):
            try:
                summary = json.loads(f.read_text())
            except ValueError:
                continue
            for k, v in (summary.get("metrics") or {}).items():
                if _finite(v):
                    out[f"eval/{f.parent.name}/{k}"] = v
    return out


def summary_rows(run_dirs: Sequence[Path]) -> tuple:
    """(varying keys, rows): one dict per run with the varying config values and the run's results (eval task
    metrics as eval/<task>/<metric> keys, before run_dir)."""
    overrides = [_overrides(r) for r in run_dirs]
    # Sweep jobs: compare what was overridden (as typed); other runs: their resolved configs.
    configs = overrides if all(o is not None for o in overrides) else [_config(r) for r in run_dirs]
    keys = varying_keys(configs)
    rows = []
    for run_dir, cfg in zip(run_dirs, configs):
        recs = read_metrics(run_dir)
        train = [r for r in recs if "loss" in r]
        evals = [r["eval_loss"] for r in recs if "eval_loss" in r and _finite(r["eval_loss"])]
        speeds = [r["trained_tokens_per_s"] for r in train if "trained_tokens_per_s" in r]
        row = {k: cfg.get(k, "") for k in keys}
        row.update(status=status_of(run_dir, recs),
                   final_loss=train[-1]["loss"] if train else None,
                   best_eval_loss=min(evals) if evals else None,
                   trained_tokens_per_s=sum(speeds) / len(speeds) if speeds else None)
        row.update(eval_metrics(run_dir, recs))
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return keys, rows


def eval_columns(rows: list[dict]) -> list[str]:
    """The eval/<task>/<metric> keys any row has, in a fixed order."""
    return sorted({k for r in rows for k in r if k.startswith("eval/")})


def columns_of(keys: list[str], rows: list[dict]) -> list[str]:
    return list(keys) + list(METRIC_COLUMNS[:-1]) + eval_columns(rows) + [METRIC_COLUMNS[-1]]


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
    """Best first: highest for eval metrics and tokens/s, lowest for losses; runs without it last."""
    have = [r for r in rows if _finite(r.get(metric))]
    if not have:
        known = [c for c in columns_of([], rows) if any(_finite(r.get(c)) for r in rows)]
        raise XtuneError(f"--sort {metric}: no run has it; choose one of {', '.join(known) or '(none)'}")
    lower_better = "loss" in metric
    have.sort(key=lambda r: r[metric] if lower_better else -r[metric])
    return have + [r for r in rows if not _finite(r.get(metric))]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_summary(sweep_dir: Path, keys: list[str], rows: list[dict]) -> None:
    columns = columns_of(keys, rows)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)
    (sweep_dir / "summary.json").write_text(json.dumps({"varying": keys, "runs": rows}, indent=2) + "\n")


def print_table(keys: list[str], rows: list[dict], console, title: str = "runs") -> None:
    table = Table(title=title)
    columns = columns_of(keys, rows)
    for col in columns:
        # Paths and override values wrap rather than being cut; status and numbers stay on one line.
        numeric = col in METRIC_COLUMNS[1:4] or col.startswith("eval/")
        table.add_column(col, justify="right" if numeric else "left",
                         no_wrap=col in METRIC_COLUMNS[:4], overflow="fold")
    for row in rows:
        cells = []
        for col in columns:
            v = row.get(col)
            cells.append("-" if v is None else f"{v:.4f}" if col in ("final_loss", "best_eval_loss")
                         or col.startswith("eval/") else f"{v:.0f}" if col == "trained_tokens_per_s" else str(v))
        table.add_row(*cells)
    console.print(table)


def label(row: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in keys) or Path(row["run_dir"]).name


def plot_runs(run_dirs: Sequence[Path], metric: str = "loss"):
    """One line per run (x: step, y: metric) labelled by its varying overrides; returns the matplotlib Figure."""
    try:  # lazy: matplotlib is the optional plot extra (xtune[plot])
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise XtuneError("xtune plot needs matplotlib: pip install 'xtune[plot]'") from None
    keys, rows = summary_rows(run_dirs)
    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = 0
    for run_dir, row in zip(run_dirs, rows):
        pts = [(r["step"], r[metric]) for r in read_metrics(run_dir) if metric in r and _finite(r[metric])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label(row, keys), marker="." if len(pts) < 30 else None)
            plotted += 1
    if not plotted:
        have = sorted({k for r in run_dirs for rec in read_metrics(r) for k in rec if k != "step"})
        raise XtuneError(f"--metric {metric}: no run has it in metrics.jsonl (they have: {', '.join(have) or 'nothing'})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def summarize(paths: Sequence[Path], console, out_dir: Path | None = None, title: str = "runs",
              sort: str | None = None) -> list[dict]:
    runs = find_runs(paths)
    keys, rows = summary_rows(runs)
    if sort:
        rows = sort_rows(rows, sort)
    print_table(keys, rows, console, title)
    if out_dir is not None:
        write_summary(out_dir, keys, rows)
    return rows
