"""`xtune eval` under torchrun on 2 ranks (gloo): each rank generates its share of the prompts, rank 0 writes; the
greedy samples and metrics equal the 1-rank run's. Sampling (n per prompt, pass@k) runs on 2 ranks too (its seeds
are per rank: the generation engine's contract, so its completions are not compared across rank counts)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.distributed.tiny import child_env, free_port
from tests.integration.test_eval_run import model_dir  # noqa: F401 (the tiny model folder fixture)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
DEMO_EVAL = ROOT / "src" / "xtune" / "assets" / "demo" / "eval.jsonl"


def _eval(model, out, ranks, *extra):
    args = ["-m", "xtune", "eval", str(model), f"eval.data.path={DEMO_EVAL}", "eval.limit=7", "gen.max_new_tokens=5",
            "gen.batch_size=3", "--out", str(out), *extra]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", *args]
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)


def _read(out, task="eval"):
    folder = out / "eval" / task
    samples = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
    return json.loads((folder / "summary.json").read_text()), samples


def test_two_ranks_equal_one_rank(model_dir, tmp_path):  # noqa: F811
    one, two = _eval(model_dir, tmp_path / "one", 1), _eval(model_dir, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    (s1, r1), (s2, r2) = _read(tmp_path / "one"), _read(tmp_path / "two")
    assert len(r1) == 7 and s1["samples"] == 7
    keys = ("source", "prompt", "reference", "completion", "score")
    assert [{k: r[k] for k in keys} for r in r1] == [{k: r[k] for k in keys} for r in r2]
    assert len({r["completion"] for r in r1}) > 1  # not one degenerate answer for every prompt
    assert s1["metrics"] == s2["metrics"]
    assert two.stdout.count("results:") == 1  # rank 0 alone prints and writes

    sampled = _eval(model_dir, tmp_path / "two", 2, "gen.temperature=1.0", "gen.n=3", "eval.k=[1,2]", "gen.seed=5",
                    "eval.name=sampled")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    summary, rows = _read(tmp_path / "two", "sampled")
    assert set(summary["metrics"]) == {"accuracy", "pass@2"} and all(len(r["completions"]) == 3 for r in rows)
