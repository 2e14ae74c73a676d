"""`xtune dpo`, SIGKILLed mid-run and resumed with train.resume=auto: the reference log-probs are read back from
the run directory (not recomputed from the trained weights), and every step's loss, gradient norm and reward
metrics equal an uninterrupted run's exactly."""

import json

from tests.reliability.helpers import DEMO, assert_same_losses, records, xtune
from tests.reliability.test_kill_resume import kill_after_step

STEPS = 6


def _args(data, cache, work_dir, *extra):
    return ["dpo", "recipe=demo_dpo", f"data.datasets=[{{name:pref,path:{data}}}]", "data.eval_datasets=[]",
            "train.eval_every=0", "data.pack_max_length=256", "data.sample_max_length=128",
            f"data.cache_dir={cache}", "data.num_workers=0", "logging.tensorboard=false", "logging.progress=plain",
            "train.log_every=1", f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=2",
            f"train.work_dir={work_dir}", *extra]


def test_dpo_sigkill_and_resume_is_exact_with_stored_reference(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join((DEMO / "pref_train.jsonl").read_text().splitlines()[:48]) + "\n")
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    out = xtune(*_args(data, tmp_path / "c1", ref_run), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected = records(ref_run)
    assert len(expected) == STEPS and abs(expected[0]["loss"] - 0.6931471805599453) < 1e-6  # ln 2 at step 1

    # A separate data cache: the killed run cannot borrow the reference run's shared copy.
    kill_after_step(_args(data, tmp_path / "c2", run), run, 3)
    stored = sorted((run / "reference").glob("train-*.npy"))
    assert len(stored) == 1
    before = stored[0].stat().st_mtime_ns
    out = xtune(*_args(data, tmp_path / "c2", run, "train.resume=auto"), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "read from" in log and "computing the reference" not in log, log[-3000:]
    assert stored[0].stat().st_mtime_ns == before
    got = records(run)
    assert_same_losses(expected, got)
    for a, b in zip(expected, got):
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            assert a[key] == b[key], (a["step"], key)
    assert json.loads((run / "hf" / "config.json").read_text())["model_type"] == "qwen3"
