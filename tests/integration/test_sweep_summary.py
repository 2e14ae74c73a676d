"""A sweep ends with a comparison table (also summary.csv / summary.json), `xtune runs` prints it again for
existing directories, and `xtune plot` draws one line per run. Every number is checked against the runs' own
metrics.jsonl, read here independently."""

import csv
import json
import sys
from pathlib import Path

import pytest

from tests.integration.test_cli import xtune

RUN = ["train.max_steps=2", "train.log_every=1", "train.eval_every=1", "train.save_every=0", "train.sample_prompts=[]",
       "data.pack_max_length=512", "data.sample_max_length=256", "train.global_batch_size=2",
       "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    bad = tmp / "not_a_checkpoint"
    bad.write_text("x")
    out = xtune("sft", "-m", "recipe=demo", "optim.lr=1e-3,3e-3", f"train.resume=null,{bad}", *RUN,
                f"data.cache_dir={tmp}/cache", f"hydra.sweep.dir={tmp / 'sweep'}", timeout=900)
    return tmp / "sweep", out


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sweep_table_matches_the_runs_metrics(sweep):
    root, out = sweep
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # two points failed (bad checkpoint: exit 2)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["varying"] == ["optim.lr", "train.resume"]
    rows = summary["runs"]
    assert sorted(Path(r["run_dir"]).name for r in rows) == ["0", "1", "2", "3"]
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(ok) == 2 and {r["train.resume"] for r in ok} == {"null"}
    assert {r["optim.lr"] for r in ok} == {"0.001", "0.003"}
    assert [r["status"] for r in failed] == ["failed (exit 2)"] * 2
    for r in ok:
        recs = metrics(r["run_dir"])
        train = [x for x in recs if "loss" in x]
        assert r["final_loss"] == train[-1]["loss"]
        assert r["best_eval_loss"] == min(x["eval_loss"] for x in recs if "eval_loss" in x)
        speeds = [x["trained_tokens_per_s"] for x in train]
        assert r["trained_tokens_per_s"] == pytest.approx(sum(speeds) / len(speeds))
    for r in failed:
        assert r["final_loss"] is None and r["best_eval_loss"] is None
        # A failed point is one line, and the sweep went on.
        assert f"job failed ({r['run_dir']})" in out.stderr
    assert "Traceback" not in out.stderr
    # Each point has its own run dir with its config, command line and environment, and its own export.
    for r in ok:
        d = Path(r["run_dir"])
        assert f"work_dir: {d}" in (d / "config.yaml").read_text() and (d / "hf" / "config.json").is_file()
        assert "xtune sft -m recipe=demo optim.lr=1e-3,3e-3" in (d / "cmd.txt").read_text()
        assert {"python", "torch", "transformers", "xtune"} <= set(json.loads((d / "env.json").read_text()))
    # The CSV holds the same table; the printed one names every run dir and both statuses.
    with open(root / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["run_dir"] for row in table] == [r["run_dir"] for r in rows]
    assert [float(row["final_loss"]) for row in table if row["status"] == "ok"] == [r["final_loss"] for r in ok]
    assert "failed (exit 2)" in out.stdout and "summary.csv" in out.stdout
    assert f"{ok[0]['final_loss']:.4f}" in out.stdout
    # The demo recipe's eval task (train.eval_tasks=[demo]) is a column: each point's value from its own run.
    for r, row in zip(rows, table):
        summary = Path(r["run_dir"]) / "eval" / "demo" / "summary.json"
        if r["status"] == "ok":
            want = json.loads(summary.read_text())["metrics"]["accuracy"]
            assert r["eval/demo/accuracy"] == want and float(row["eval/demo/accuracy"]) == want
        else:
            assert "eval/demo/accuracy" not in r and row["eval/demo/accuracy"] == ""
    assert "eval/demo/accuracy" in out.stdout


def test_runs_command_prints_the_same_table(sweep):
    root, _ = sweep
    rows = json.loads((root / "summary.json").read_text())["runs"]
    out = xtune("runs", str(root), "--sort", "eval/demo/accuracy", env={"COLUMNS": "250"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval/demo/accuracy" in out.stdout
    for r in rows:
        assert r["run_dir"] in out.stdout
        if r["final_loss"] is not None:
            assert f"{r['final_loss']:.4f}" in out.stdout and f"{r['best_eval_loss']:.4f}" in out.stdout
    assert out.stdout.count("failed (exit 2)") == 2
    bad = xtune("runs", str(root / "nope"))
    assert bad.returncode == 2 and "no such run or sweep directory" in bad.stderr


def test_plot_draws_one_line_per_run_with_its_data(sweep, tmp_path):
    from xtune.runs import plot_runs

    root, _ = sweep
    rows = [r for r in json.loads((root / "summary.json").read_text())["runs"] if r["status"] == "ok"]
    dirs = [Path(r["run_dir"]) for r in rows]
    for metric, key in (("loss", "loss"), ("eval_loss", "eval_loss")):
        fig = plot_runs(dirs, metric)
        lines = fig.axes[0].get_lines()
        assert len(lines) == len(dirs)
        for line, d, r in zip(lines, dirs, rows):
            want = [(x["step"], x[key]) for x in metrics(d) if key in x]
            assert list(zip(line.get_xdata(), line.get_ydata())) == want
            assert line.get_label() == f"optim.lr={r['optim.lr']}"  # train.resume is the same for these two
    png = tmp_path / "curves.png"
    out = xtune("plot", *map(str, dirs), "-o", str(png), "--metric", "loss")
    assert out.returncode == 0, out.stderr[-2000:]
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100
    out = xtune("plot", str(dirs[0]), "-o", str(png), "--metric", "nonsense")
    assert out.returncode == 2 and "--metric nonsense" in out.stderr and "loss" in out.stderr


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from xtune.errors import XtuneError
    from xtune.runs import plot_runs

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra sees
    with pytest.raises(XtuneError, match=r"pip install 'xtune\[plot\]'"):
        plot_runs([run])
