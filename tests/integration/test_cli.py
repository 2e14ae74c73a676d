"""The `xtune` command as a user runs it: real processes, exit codes and messages."""

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
XTUNE = [sys.executable, "-m", "xtune"]


def xtune(*args, cwd=None, env=None, timeout=120):
    return subprocess.run(
        XTUNE + list(args), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "sys.argv = ['xtune', '--help']\n"
        "from xtune.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', 'torch' in sys.modules, 'hydra' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "sft" in out.stdout and "recipes" in out.stdout
    assert "IMPORTED False False False" in out.stdout
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xtune", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t < 3.0  # generous: the bench measures the real figure


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optim.lrr=1e-4"], "optim.lrr=1e-4: unknown key 'lrr' in optim. Did you mean 'lr'?"),
        (["train.global_batch_size=eight"], "train.global_batch_size=eight"),
        (["model=qwen3_tny"], "model=qwen3_tny: no such model"),
        (["data.sample_max_length=9999"], "data.sample_max_length=9999 is larger than data.pack_max_length=2048"),
        (["parallel.nproc_per_node=2", "train.global_batch_size=3"], "train.global_batch_size=3 is not divisible"),
        (["loss.reduction=mean"], "loss.reduction=mean: not allowed; choose one of token, sample, square"),
        (["optim.lr=1e-4,2e-4"], "add -m/--multirun"),
    ],
)
def test_config_mistakes_exit_2_naming_the_key(args, expected):
    out = xtune("sft", "recipe=demo", *args, "--dry-run")
    assert out.returncode == 2, out.stdout + out.stderr
    assert expected in out.stderr.replace("\n", " ") or expected in out.stderr
    assert "Traceback" not in out.stderr


def test_problems_reported_together_in_one_run():
    out = xtune("sft", "recipe=demo", "optim.lrr=1", "train.seed=abc", "sched=cosin", "--dry-run")
    assert out.returncode == 2
    assert "3 configuration problems" in out.stderr
    assert "Did you mean 'cosine'" in out.stderr


def test_intern_s1_mini_needs_load_from_but_tiny_variant_validates():
    out = xtune("sft", "recipe=intern_s1_mini", "--dry-run")
    assert out.returncode == 2 and "model.load_from is required" in out.stderr
    out = xtune("sft", "recipe=intern_s1_mini", "model=intern_s1_tiny", "parallel=single", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "gradient_accumulation: 8" in out.stdout


def test_dry_run_prints_the_plan_of_each_sweep_point():
    out = xtune("sft", "-m", "recipe=demo", "optim.lr=1e-4,3e-4", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("gradient_accumulation") == 2
    assert "optim.lr=0.0001" in out.stdout and "optim.lr=0.0003" in out.stdout


def test_cfg_job_and_config_show_print_the_resolved_spec():
    out = xtune("sft", "recipe=demo", "optim.lr=0.125", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.125" in out.stdout and "hydra:" not in out.stdout
    out = xtune("config", "show", "recipe=demo", "train.seed=7")
    assert out.returncode == 0 and "seed: 7" in out.stdout
    assert str(ROOT / "src/xtune/assets/demo/train.jsonl") in out.stdout  # ${asset:...} resolved


def test_recipes_table_lists_every_recipe():
    out = xtune("recipes", env={"COLUMNS": "200"})
    assert out.returncode == 0
    for name in ("demo", "intern_s1_mini", "qwen3_8b", "qwen3_30b_a3b"):
        assert name in out.stdout


def test_wheel_carries_conf_and_recipes_and_composes_outside_the_tree(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("xtune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "xtune/conf/sft.yaml" in names and "xtune/recipes/intern_s1_mini.yaml" in names
    assert "xtune/conf/model/qwen3_tiny.yaml" in names
    assert any(n.startswith("xtune/assets/tokenizers/qwen3_tiny/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import xtune, sys\n"
        f"assert xtune.__file__.startswith({str(site)!r}), xtune.__file__\n"
        "from xtune.config.compose import load_spec\n"
        "_, spec = load_spec(['recipe=demo'])\n"
        "print('OK', spec.recipe, spec.data.datasets[0].path)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    assert f"OK demo {site}/xtune/assets/demo/train.jsonl" in out.stdout


FAST = ["train.max_steps=2", "train.log_every=1", "train.eval_every=0", "train.save_every=0", "train.sample_prompts=[]",
        "data.eval_datasets=[]", "data.pack_max_length=512", "train.global_batch_size=2"]


def _steps(run_dir):
    import json

    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


# Slow: tests/integration/test_engine_e2e.py runs the same launch (nproc_per_node=2 starts torchrun) with
# more checks, and every 2-rank family test goes through this command line.
@pytest.mark.slow
def test_nproc_per_node_starts_the_workers_itself(tmp_path):
    run = tmp_path / "run"
    out = xtune("sft", "recipe=demo", "parallel.nproc_per_node=2", *FAST, f"train.work_dir={run}",
                f"data.cache_dir={tmp_path}/cache", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert _steps(run) == [1, 2]
    assert (run / "hf" / "config.json").exists() and (run / "checkpoints" / "latest").exists()
    # Both ranks wrote their shard of the checkpoint.
    step = (run / "checkpoints" / "latest").read_text().strip()
    assert len(list((run / "checkpoints" / step).glob("*.distcp"))) == 2


def test_external_torchrun_ranks_agree_on_one_run_dir(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "xtune", "sft", "recipe=demo", *FAST, f"data.cache_dir={tmp_path}/cache"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    runs = list((tmp_path / "work_dirs" / "demo").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run-"), runs
    assert _steps(runs[0]) == [1, 2]
    assert (runs[0] / "config.yaml").exists() and (runs[0] / "hf" / "config.json").exists()


def test_hydra_launcher_plugins_work_unchanged(tmp_path):
    """The submitit launcher (the Slurm one's local twin) runs each sweep point as its own process; the sweep's
    table and exit code are still made at the end, from the sweep directory Hydra resolved."""
    sweep = tmp_path / "sweep"
    out = xtune("sft", "-m", "recipe=demo", "optim.lr=1e-3,2e-3", "train.max_steps=1", "train.eval_every=0",
                "train.sample_prompts=[]", "data.eval_datasets=[]", "data.pack_max_length=512",
                f"data.cache_dir={tmp_path}/cache", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
                "hydra.launcher.timeout_min=10", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for job in ("0", "1"):
        assert _steps(sweep / job) == [1]
        assert (sweep / job / "hf" / "config.json").exists()
    assert list((sweep / ".submitit").iterdir())  # the jobs really went through submitit
    rows = __import__("json").loads((sweep / "summary.json").read_text())["runs"]
    assert [(r["optim.lr"], r["status"]) for r in rows] == [("0.001", "ok"), ("0.002", "ok")]
    assert "summary.csv" in out.stdout


def test_export_command_and_data_inspect(tmp_path):
    run = tmp_path / "run"
    out = xtune("sft", "recipe=demo", *FAST, f"train.work_dir={run}", f"data.cache_dir={tmp_path}/cache")
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    out = xtune("export", str(ckpt), str(tmp_path / "exported"))
    assert out.returncode == 0, out.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "exported" / "model.safetensors"))
    b = load_file(str(run / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)  # same weights as the run's export
    out = xtune("export", str(tmp_path / "nope"), str(tmp_path / "x"))
    assert out.returncode != 0 and "nope" in out.stderr and "Traceback" not in out.stderr
    out = xtune("export", str(ckpt), str(tmp_path / "x"), "--adapter-only")  # a full run has no adapter
    assert out.returncode == 2 and "full-parameter run" in out.stderr and "Traceback" not in out.stderr

    out = xtune("data", "inspect", "recipe=demo", f"data.cache_dir={tmp_path}/cache", env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo_tasks" in out.stdout and "efficiency" in out.stdout and "<|im_start|>assistant" in out.stdout


def _user_config_dir(tmp_path):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "my_tiny.yaml").write_text(
        "name: my_tiny\nfamily: qwen3\ntokenizer: builtin:qwen3_tiny\n"
        "arch: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,"
        " num_key_value_heads: 1, head_dim: 16}\n")
    (conf / "recipes").mkdir()
    (conf / "recipes" / "mine.yaml").write_text(
        "description: my own recipe\ndefaults:\n  - override /model: my_tiny\n  - override /data: demo\n"
        "  - override /parallel: single\ntrain:\n  global_batch_size: 1\n  micro_batch_size: 1\n")
    return conf


def test_config_dir_adds_recipes_and_groups(tmp_path):
    conf = _user_config_dir(tmp_path)
    out = xtune("recipes", "--config-dir", str(conf), env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "mine" in out.stdout and "my own recipe" in out.stdout and "demo" in out.stdout
    out = xtune("sft", "recipe=mine", "--config-dir", str(conf), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "my_tiny (qwen3, random init)" in out.stdout
    out = xtune("sft", "recipe=mine", "--dry-run")  # without the folder the recipe is unknown
    assert out.returncode == 2 and "recipe=mine: no such recipe" in out.stderr


def test_bad_cfg_value_exits_2():
    out = xtune("sft", "recipe=demo", "--cfg", "jobs")
    assert out.returncode == 2 and "--cfg jobs: choose one of job, hydra, all" in out.stderr
    assert "Traceback" not in out.stderr


def test_recipe_file_runs(tmp_path):
    recipe = tmp_path / "quick.yaml"
    recipe.write_text("description: from a file\ndefaults:\n  - override /model: qwen3_tiny\n"
                      "  - override /data: demo\n  - override /parallel: single\n"
                      "train: {global_batch_size: 1, micro_batch_size: 1, epochs: null, max_steps: 1, eval_every: 0,"
                      " save_every: 0, sample_prompts: []}\ndata: {eval_datasets: [], pack_max_length: 512}\n")
    run = tmp_path / "run"
    out = xtune("sft", f"recipe={recipe}", f"train.work_dir={run}", f"data.cache_dir={tmp_path}/cache", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert _steps(run) == [1] and "recipe: quick" in (run / "config.yaml").read_text()
