"""Adapter runs resume exactly: SIGKILL a `peft=lora` CLI run of the random-init tiny model and resume it
with `train.resume=auto`. The checkpoints hold only the adapters (plus optimizer, loader, RNG); the frozen
random base comes back from the <work_dir>/base folder the run wrote once, so the resumed run must give the
uninterrupted run's per-step losses, grad norms and LRs exactly, and the same final adapter."""

import os
import signal
import time

import torch

from tests.reliability.helpers import assert_same_losses, last_step, records, run_args, start, xtune

LORA = ["peft=lora", "peft.r=4", "peft.alpha=8", "peft.modules_to_save=[]", "optim.lr=1e-2"]


def test_lora_sigkill_then_resume_is_exact(workspace, tmp_path):
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    out = xtune(*run_args(workspace["data"], workspace["cache"], ref, *LORA))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    want = records(ref)
    assert want[-1]["loss"] < want[0]["loss"]
    assert (ref / "base" / "model.safetensors").is_file() and (ref / "hf_adapter" / "adapter_config.json").is_file()

    run = tmp_path / "run"
    proc = start(*run_args(workspace["data"], workspace["cache"], run, *LORA))
    deadline = time.time() + 120
    try:
        while last_step(run) < 4:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "step 4 never came"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "base" / "model.safetensors").is_file()

    out = xtune(*run_args(workspace["data"], workspace["cache"], run, *LORA, "train.resume=auto"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from " in out.stdout
    assert_same_losses(want, records(run))
    a = load_file(str(ref / "hf_adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "hf_adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoints hold the adapters, not the frozen base
    saved = sum(f.stat().st_size for f in (run / "checkpoints" / "step-10").iterdir())
    assert saved < 0.5 * (run / "base" / "model.safetensors").stat().st_size
