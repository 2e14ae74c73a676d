"""Checkpoint atomicity and corruption detection, failed saves, and the non-finite-step skip
(single process: a 1-rank FSDP2 group in this process)."""

import dataclasses as dc
import json
import shutil

import pytest
import torch

from tests.distributed.tiny import ListLoader, TinyAdapter, save_tiny_hf
from xtune.checkpoint.dcp import read_marker, resolve_resume
from xtune.config.schema import LoggingSpec, LossSpec, ModelSpec, OptimSpec, RunSpec, TrainSpec
from xtune.engine.trainer import Trainer
from xtune.errors import CheckpointError, XtuneError
from xtune.methods import get_method, train
from xtune.parallel.distributed import init_distributed


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    save_tiny_hf(d, seed=2)
    return d


def make_spec(init_dir, steps=4, **train_kw):
    return RunSpec(model=ModelSpec(load_from=str(init_dir)), loss=LossSpec(mode="chunk"), optim=OptimSpec(lr=1e-2),
                   train=TrainSpec(global_batch_size=2, max_steps=steps, **train_kw),
                   logging=LoggingSpec(tensorboard=False, progress="plain"))


def run(spec, run_dir, steps=4, adapter=None):
    return train(spec, run_dir, adapter=adapter or TinyAdapter(spec.model), tokenizer=None,
                 loader=ListLoader(steps, 2, 0, 1, 2, seed=4, cycle=2))


@pytest.fixture(scope="module")
def finished(init_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run(make_spec(init_dir, save_every=2, keep_last=3), run_dir)
    return run_dir


def test_layout_and_auto_resume_target(finished):
    ck = finished / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-2", "step-4"]
    assert read_marker(ck / "step-4")["step"] == 4
    assert resolve_resume("auto", finished) == ck / "step-4"
    assert resolve_resume(str(finished), finished) == ck / "step-4"
    assert resolve_resume(str(ck / "step-2"), finished) == ck / "step-2"
    assert resolve_resume(None, finished) is None
    assert {"metrics.jsonl", "config.yaml", "hf", "checkpoints"} <= {p.name for p in finished.iterdir()}


@pytest.mark.parametrize("damage,reason", [
    ("no_marker", r"step-4 is incomplete \(no meta\.json\): the save was interrupted"),
    ("garbage_marker", r"step-4 has an unreadable meta\.json \(Expecting property name"),
    ("incomplete_flag", r"step-4 is not marked complete"),
    ("no_dcp_metadata", r"step-4 is corrupt: missing \.metadata$"),
    ("no_state", r"step-4 is corrupt: missing state\.json$"),
], ids=lambda v: v if "step-4" not in v else "")
def test_corrupt_checkpoint_is_refused(finished, tmp_path, damage, reason):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    ck = run_dir / "checkpoints" / "step-4"
    if damage == "no_marker":
        (ck / "meta.json").unlink()
    elif damage == "garbage_marker":
        (ck / "meta.json").write_text("{not json")
    elif damage == "incomplete_flag":
        meta = json.loads((ck / "meta.json").read_text())
        (ck / "meta.json").write_text(json.dumps(dict(meta, complete=False)))
    elif damage == "no_dcp_metadata":
        (ck / ".metadata").unlink()
    else:
        (ck / "state.json").unlink()
    with pytest.raises(CheckpointError, match=reason):
        resolve_resume("auto", run_dir)
    with pytest.raises(CheckpointError, match=reason):
        resolve_resume(str(ck), run_dir)


def test_leftover_tmp_and_missing_latest(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    ck = run_dir / "checkpoints"
    # A save killed half-way leaves .tmp-step-6 (no marker); `latest` still names step-4.
    shutil.copytree(ck / "step-4", ck / ".tmp-step-6")
    (ck / ".tmp-step-6" / "meta.json").unlink()
    assert resolve_resume("auto", run_dir) == ck / "step-4"
    # Killed between the rename and the `latest` update: the newest complete step-N is used.
    (ck / "latest").unlink()
    assert resolve_resume("auto", run_dir) == ck / "step-4"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "nowhere"), run_dir)


def test_corrupt_resume_fails_before_training(finished, init_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "checkpoints" / "step-4" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        run(make_spec(init_dir, steps=6, resume="auto"), run_dir, steps=6)
    assert not torch.distributed.is_initialized()


def test_failed_save_keeps_previous_checkpoint(init_dir, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save
    calls = []

    def flaky_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", flaky_save)
    with pytest.raises(CheckpointError, match="No space left.*step-2 is intact"):
        run(make_spec(init_dir, save_every=2), tmp_path)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-2"]
    assert resolve_resume("auto", tmp_path) == ck / "step-2"
    assert not torch.distributed.is_initialized()


def test_unwritable_checkpoint_folder(init_dir, tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(CheckpointError, match="saving checkpoint step 2"):
        run(make_spec(init_dir, save_every=2), tmp_path)


def test_nonfinite_step_is_skipped_and_streak_stops(init_dir, tmp_path):
    spec = make_spec(init_dir, steps=6, max_bad_steps=2)
    denv = init_distributed(spec.parallel)
    try:
        # Forward calls 2 and 4,5 (one micro-batch per step here) produce NaN hidden states.
        adapter = TinyAdapter(spec.model, nan_at_steps={2, 4, 5})
        spec = dc.replace(spec, train=dc.replace(spec.train, global_batch_size=1))
        tr = Trainer(spec, tmp_path, method=get_method(spec), adapter=adapter, tokenizer=None, denv=denv,
                     loader=ListLoader(6, 1, 0, 1, 1, seed=4))
        params = lambda: {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                          for n, p in tr.model.named_parameters()}
        recs = [tr.train_step(next(tr.loader)) for _ in range(2)]
        before = params()
        adam_steps = tr.optimizer.state[tr.params[0]]["step"].item()
        rec = tr.train_step(next(tr.loader))
        assert rec["skipped"] and not torch.isfinite(torch.tensor(rec["grad_norm"]))
        after = params()
        assert all(torch.equal(before[n], after[n]) for n in before)  # weights untouched
        assert tr.optimizer.state[tr.params[0]]["step"].item() == adam_steps  # no Adam update
        assert all(p.grad is None for p in tr.params)
        rec = tr.train_step(next(tr.loader))  # a good step resets the streak
        assert not rec.get("skipped") and tr.bad_streak == 0 and tr.skipped_steps == 1
        assert any(not torch.equal(after[n], v) for n, v in params().items())
        tr.train_step(next(tr.loader))  # bad 1
        with pytest.raises(XtuneError, match="2 steps in a row had a non-finite gradient norm"):
            tr.train_step(next(tr.loader))  # bad 2 = max_bad_steps
        assert all(r["loss"] == r["loss"] for r in recs)
    finally:
        denv.close()


def test_hf_every_writes_step_folders_pruned_by_keep_last(init_dir, tmp_path):
    """hf/step-N every N steps (keep_last of them), the final export in hf/ itself; each folder holds the
    weights of its own step, read back with safetensors against the DCP checkpoint of that step."""
    from safetensors.torch import load_file

    from xtune.checkpoint.dcp import load_model_only
    from xtune.checkpoint.hf_export import build_plain_model
    from xtune.config.io import spec_from_yaml

    run(make_spec(init_dir, steps=8, hf_every=2, save_every=2, keep_last=2), tmp_path, steps=8)
    hf = tmp_path / "hf"
    assert sorted(p.name for p in hf.iterdir() if p.is_dir()) == ["step-4", "step-6"]  # step-2 pruned
    weights = {name: load_file(str(hf / name / "model.safetensors")) for name in ("step-4", "step-6", ".")}
    for step, name in ((6, "step-6"), (8, ".")):
        spec = spec_from_yaml(tmp_path / "config.yaml")
        model, _ = build_plain_model(TinyAdapter(spec.model), spec)
        load_model_only(tmp_path / "checkpoints" / f"step-{step}", model)
        want = model.state_dict()
        assert all(torch.equal(weights[name][k], want[k]) for k in weights[name]), name
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights["step-4"][key], weights["step-6"][key])
    assert not torch.equal(weights["step-6"][key], weights["."][key])


def test_bf16_mixed_precision_single_process(init_dir, tmp_path):
    from torch.distributed.tensor import DTensor

    from xtune.config.schema import ParallelSpec

    losses = {}
    for dtype in ("float32", "bfloat16"):
        spec = dc.replace(make_spec(init_dir), parallel=ParallelSpec(param_dtype=dtype))
        denv = init_distributed(spec.parallel)
        try:
            tr = Trainer(spec, tmp_path, method=get_method(spec), adapter=TinyAdapter(spec.model), tokenizer=None, denv=denv,
                         loader=ListLoader(1, 2, 0, 1, 2, seed=4))
            losses[dtype] = tr.forward_backward(next(tr.loader))["loss"]
            params = list(tr.model.parameters())
            # bf16 compute goes through FSDP2 mixed precision; the master weights and grads stay fp32.
            assert all(isinstance(p, DTensor) == (dtype == "bfloat16") for p in params)
            assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
        finally:
            denv.close()
    assert losses["float32"] != losses["bfloat16"]
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.02 * losses["float32"]


# ----------------------------------------------------------------------------------------- integrity


def _region(ck, prefix):
    """(file, offset) of the first byte of a tensor whose key starts with `prefix` in a DCP shard, read from
    DCP's own metadata (so the test damages exactly the model's or the optimizer's bytes)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ck)).read_metadata()
    for index, info in md.storage_data.items():
        if index.fqn.startswith(prefix) and info.length > 64:
            return ck / info.relative_path, info.offset + info.length // 2
    raise AssertionError(prefix)


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["model_shard", "optim_shard", "state", "truncated"])
def test_damaged_file_is_refused_naming_it(finished, init_dir, tmp_path, damage):
    from xtune.checkpoint.hf_export import export_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    ck = run_dir / "checkpoints" / "step-4"
    if damage in ("model_shard", "optim_shard"):
        path, offset = _region(ck, "model." if damage == "model_shard" else "optim.")
        flip(path, offset)
        why = "does not match its xxh3_128 checksum"
    elif damage == "state":
        path = ck / "state.json"
        path.write_text(path.read_text().replace('"step": 4', '"step": 5'))  # same size, other bytes
        why = "does not match its xxh3_128 checksum"
    else:
        path = max(ck.glob("*.distcp"), key=lambda p: p.stat().st_size)
        path.write_bytes(path.read_bytes()[:-100])
        why = "truncated"
    name = path.name
    with pytest.raises(CheckpointError, match=f"checkpoint {ck} is corrupt: {name}.*{why}"):
        run(make_spec(init_dir, steps=6, resume="auto"), run_dir, steps=6)
    assert not torch.distributed.is_initialized()
    assert max(json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    with pytest.raises(CheckpointError, match=f"checkpoint {ck} is corrupt: {name}"):
        export_checkpoint(ck, tmp_path / "hf", adapter=TinyAdapter(ModelSpec()))
    assert not (tmp_path / "hf").exists()


def test_a_marker_with_other_checksums_is_refused(finished, tmp_path):
    """xtune writes one checksum (xxh3_128): a marker whose files carry another (sha256 here, valid ones) fails the
    check for every file, naming the checksum it lacks."""
    import hashlib

    from xtune.checkpoint.integrity import verify_checkpoint

    ck = tmp_path / "step-4"
    shutil.copytree(finished / "checkpoints" / "step-4", ck)
    meta = json.loads((ck / "meta.json").read_text())
    meta["files"] = {n: {"sha256": hashlib.sha256((ck / n).read_bytes()).hexdigest(), "bytes": f["bytes"]}
                     for n, f in meta["files"].items()}
    (ck / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(ck) == [f"{n} has no xxh3_128 checksum in the marker" for n in sorted(meta["files"])]


def _pickled_state(ck, payload=None):
    """Rewrite a checkpoint the way xtune never writes it: the run state pickled in `extra-rank0.pt` instead of
    state.json, and a marker without checksums."""
    import pickle

    state = json.loads((ck / "state.json").read_text())
    if payload is not None:
        state["counters"]["evil"] = payload
    with open(ck / "extra-rank0.pt", "wb") as f:
        pickle.dump(state, f, protocol=2)  # torch.save's protocol
    (ck / "state.json").unlink()
    meta = json.loads((ck / "meta.json").read_text())
    del meta["files"], meta["layout"]
    (ck / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_without_checksums_is_refused_and_never_unpickled(finished, init_dir, tmp_path):
    """A folder whose marker lists no checksums and whose state is a pickle crafted to run a command is refused
    (resume and export), naming the marker; nothing runs."""
    from xtune.checkpoint.hf_export import export_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    ck = run_dir / "checkpoints" / "step-4"
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    _pickled_state(ck, Evil())
    with pytest.raises(CheckpointError, match=f"checkpoint {ck}: its meta.json lists no files with checksums"):
        run(make_spec(init_dir, steps=6, resume="auto"), run_dir, steps=6)
    with pytest.raises(CheckpointError, match="lists no files with checksums"):
        export_checkpoint(ck, tmp_path / "hf", adapter=TinyAdapter(ModelSpec()))
    assert not canary.exists() and not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------- changed config


def test_resume_with_longer_max_steps_and_new_lr_rebuilds_the_schedule(init_dir, tmp_path, capsys):
    """A run that ended at its max_steps=6 resumed with max_steps=8 and a new lr: the diff is printed key
    by key and steps 7-8 use the cosine schedule rebuilt for 8 steps at the new peak (computed here from
    the formula), not the old schedule's floor; config.yaml keeps the first run's spec."""
    import math

    from xtune.config.io import spec_from_yaml
    from xtune.config.schema import SchedSpec

    def spec(steps, lr, **kw):
        s = make_spec(init_dir, steps=steps, save_every=2, **kw)
        return dc.replace(s, optim=OptimSpec(lr=lr), sched=SchedSpec(type="cosine", warmup_ratio=0.0,
                                                                       min_lr_ratio=0.1))

    run(spec(6, 1e-2), tmp_path, steps=6)
    run(spec(8, 2e-2, resume="auto"), tmp_path, steps=8)
    out = capsys.readouterr().out
    assert "optim.lr: 0.01 -> 0.02 (the LR schedule is rebuilt)" in out
    assert "train.max_steps: 6 -> 8 (the LR schedule is rebuilt)" in out
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert lrs[6] == pytest.approx(1e-2 * 0.1)  # the first run ended at its floor
    want = {s + 1: 2e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 7))) for s in (6, 7)}
    assert lrs[7] == pytest.approx(want[7], rel=1e-12) and lrs[8] == pytest.approx(want[8], rel=1e-12)
    assert f"step 7 uses lr {want[7]:.6g}" in out
    assert spec_from_yaml(tmp_path / "config.yaml").optim.lr == 1e-2
    assert spec_from_yaml(tmp_path / "config.step-6.yaml").optim.lr == 2e-2
