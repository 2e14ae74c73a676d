"""Metrics outputs (jsonl, TensorBoard, progress bar / plain lines, history truncation on resume) and
launcher environment detection (torchrun, Slurm)."""

import io
import json

import pytest

from xtune.config.schema import LoggingSpec
from xtune.engine.metrics import MetricsLogger, truncate_history


def rec(step, **kw):
    return dict({"step": step, "loss": 2.0 / step, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
                 "memory_gb": 0.1}, **kw)


def test_jsonl_tensorboard_and_plain_lines(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(LoggingSpec(tensorboard=True, progress="auto"), tmp_path, 10, 0, stream=out)
    log.log(rec(1))
    log.log(rec(2, skipped=True))
    log.log({"step": 2, "eval_loss": 1.5})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2] and lines[2]["eval_loss"] == 1.5
    text = out.getvalue()  # not a TTY: plain lines
    assert "step 1/10" in text and "loss 2.0000" in text and "skipped" in text and "eval_loss=1.5" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0, 1.0]
    assert [e.value for e in acc.Scalars("eval/eval_loss")] == [1.5]


def test_rich_progress_bar(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(LoggingSpec(tensorboard=False, progress="rich"), tmp_path, 10, 0, stream=out)
    log.progress.console.file = out
    log.log(rec(3))
    assert log.progress.tasks[0].completed == 3
    assert "loss 0.6667" in log.progress.tasks[0].fields["info"]
    log.close()


def test_truncate_history(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    truncate_history(p, 4)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3, 4]


def test_launched_env(monkeypatch):
    from xtune.parallel.distributed import launched_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT",
              "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        # setenv first: monkeypatch then restores the original state of variables the code under test sets.
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    assert launched_env() is None
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7")
    assert launched_env() == {"rank": 3, "world_size": 8, "local_rank": 1}
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "8", "1")
    assert os.environ["MASTER_ADDR"] == "10.0.0.7" and os.environ["MASTER_PORT"] == str(20000 + 12345 % 20000)
    # torchrun's variables take precedence once set.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_env() == {"rank": 0, "world_size": 2, "local_rank": 0}


def test_replicate_degree_must_divide_world():
    import torch

    from xtune.config.schema import ParallelSpec
    from xtune.errors import ConfigError
    from xtune.parallel.distributed import init_distributed

    with pytest.raises(ConfigError, match="replicate_degree=2"):
        init_distributed(ParallelSpec(replicate_degree=2))
    assert not torch.distributed.is_initialized()
