"""parallel.sp_size mistakes exit 2 before launch, naming the keys (one CLI run reports them together)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def xtune(*args):
    return subprocess.run([sys.executable, "-m", "xtune", "sft", "recipe=demo", *args, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sp_size_mistakes_exit_2_naming_the_keys():
    # 2 ranks, 4 heads (qwen3_tiny), rows of 2 tokens: sp=3 divides none of them.
    out = xtune("parallel.nproc_per_node=2", "parallel.sp_size=3", "data.pack_max_length=2",
                "data.sample_max_length=2")
    err = out.stderr.replace("\n", " ")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "parallel.sp_size=3 does not divide the world size 2 (parallel.nproc_per_node=2" in err
    assert "parallel.sp_size=3 does not divide the model's num_attention_heads=4" in err
    assert "data.pack_max_length=2 is shorter than parallel.sp_size=3" in err
    # Under HSDP it is the shard group that sp divides; and the data-parallel size becomes world / sp.
    out = xtune("parallel.nproc_per_node=4", "parallel.replicate_degree=2", "parallel.sp_size=4",
                "train.global_batch_size=4")
    assert out.returncode == 2 and "parallel.sp_size=4 does not divide the shard group size 2" in out.stderr


def test_sp_size_plan():
    out = xtune("parallel.nproc_per_node=2", "parallel.sp_size=2", "train.global_batch_size=2")
    assert out.returncode == 0, out.stderr
    assert "data x sequence parallel: 1 x 2" in out.stdout and "gradient_accumulation: 2" in out.stdout


def test_qwen3_8b_long_recipe_and_heads_from_config_json(tmp_path):
    import json

    import pytest

    from xtune.config.compose import load_spec
    from xtune.config.validate import plan
    from xtune.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_attention_heads": 32,
                                                      "num_key_value_heads": 8}))
    _, spec = load_spec(["recipe=qwen3_8b_long", f"model.load_from={tmp_path}"], check_files=False)
    p = spec.parallel
    assert (p.sp_size, p.nproc_per_node, p.activation_checkpointing, spec.data.pack_max_length) == (4, 8, True, 65536)
    assert plan(spec)["data x sequence parallel"] == "2 x 4"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_attention_heads": 30}))
    with pytest.raises(ConfigError, match="num_attention_heads=30"):
        load_spec(["recipe=qwen3_8b_long", f"model.load_from={tmp_path}"], check_files=False)
