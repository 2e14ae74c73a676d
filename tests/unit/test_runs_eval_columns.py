"""`xtune runs` and the sweep summary read each run's eval task metrics (eval/<task>/summary.json, else the last
eval/<task>/<metric> in metrics.jsonl) into one column per task metric; --sort orders by any of them."""

from __future__ import annotations

import csv
import json

import pytest
from rich.console import Console

from xtune.errors import XtuneError
from xtune.runs import summarize, summary_rows


def make_run(root, name, lr, losses, evals, summary=None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n")
    (d / "status.json").write_text('{"exit_code": 0}\n')
    recs = [{"step": i + 1, "loss": v, "trained_tokens_per_s": 100.0} for i, v in enumerate(losses)]
    recs += [{"step": s, **e} for s, e in evals]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for task, metrics in (summary or {}).items():
        (d / "eval" / task).mkdir(parents=True)
        (d / "eval" / task / "summary.json").write_text(json.dumps({"task": task, "metrics": metrics}))
    return d


@pytest.fixture
def sweep(tmp_path):
    make_run(tmp_path, "0", "1e-3", [3.0, 2.0], [(1, {"eval/demo/accuracy": 0.1}), (2, {"eval/demo/accuracy": 0.25})],
             {"demo": {"accuracy": 0.25}})
    make_run(tmp_path, "1", "3e-3", [3.0, 1.5], [(1, {"eval/demo/accuracy": 0.2}), (2, {"eval/demo/accuracy": 0.5})],
             {"demo": {"accuracy": 0.5}, "gsm8k": {"accuracy": 0.125, "pass@4": 0.3}})
    # stopped before its end: no summary, the last logged value counts
    make_run(tmp_path, "2", "1e-2", [3.0, 2.5], [(1, {"eval/demo/accuracy": 0.05, "eval_tasks_seconds": 1.0})])
    return tmp_path


def test_table_has_a_column_per_task_metric(sweep):
    keys, rows = summary_rows(sorted(sweep.iterdir()))
    assert keys == ["optim.lr"]
    assert [r["eval/demo/accuracy"] for r in rows] == [0.25, 0.5, 0.05]
    assert [r.get("eval/gsm8k/pass@4") for r in rows] == [None, 0.3, None]
    console = Console(record=True, width=250)
    summarize([sweep], console, out_dir=sweep)
    text = console.export_text()
    assert "eval/demo/accuracy" in text and "eval/gsm8k/pass@4" in text and "0.5000" in text
    with open(sweep / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["optim.lr", "status", "final_loss", "best_eval_loss", "trained_tokens_per_s",
                              "eval/demo/accuracy", "eval/gsm8k/accuracy", "eval/gsm8k/pass@4", "run_dir"]
    assert [row["eval/demo/accuracy"] for row in table] == ["0.25", "0.5", "0.05"]
    assert json.loads((sweep / "summary.json").read_text())["runs"][1]["eval/gsm8k/accuracy"] == 0.125


def test_sort_by_a_task_metric(sweep):
    rows = summarize([sweep], Console(file=open("/dev/null", "w")), sort="eval/demo/accuracy")
    assert [r["optim.lr"] for r in rows] == ["3e-3", "1e-3", "1e-2"]  # highest first
    rows = summarize([sweep], Console(file=open("/dev/null", "w")), sort="final_loss")
    assert [r["optim.lr"] for r in rows] == ["3e-3", "1e-3", "1e-2"]  # lowest loss first
    rows = summarize([sweep], Console(file=open("/dev/null", "w")), sort="eval/gsm8k/pass@4")
    assert rows[0]["optim.lr"] == "3e-3"  # runs without it go last
    with pytest.raises(XtuneError, match="--sort eval/nope/x: no run has it; choose one of .*eval/demo/accuracy"):
        summarize([sweep], Console(file=open("/dev/null", "w")), sort="eval/nope/x")


def test_plot_draws_a_task_metric(sweep):
    pytest.importorskip("matplotlib")
    from xtune.runs import find_runs, plot_runs

    fig = plot_runs(find_runs([sweep]), "eval/demo/accuracy")
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[0.1, 0.25], [0.2, 0.5], [0.05]]
    assert fig.axes[0].get_ylabel() == "eval/demo/accuracy"
