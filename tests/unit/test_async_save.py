"""train.async_save in one process (a 1-rank FSDP2 group, DCP's async save on its own gloo group): the state a
save returns with is the one written even though training changes the weights while the write is held back; the
marker and `latest` appear only once the write is done; the next save waits for the one in flight; keep_last
never removes the checkpoint being written nor the last complete one; a failed background write surfaces at
the next save with the previous checkpoint intact. The write is held back by blocking DCP's file writer on an
event (the real writer then runs), so each state is observed, not raced."""

import dataclasses as dc
import errno
import os
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystem

from tests.distributed.tiny import ListLoader, TinyAdapter
from tests.unit.test_engine_checkpoint import init_dir, make_spec  # noqa: F401 - init_dir is a fixture
from xtune.checkpoint.dcp import load_model_only, read_marker
from xtune.checkpoint.hf_export import build_plain_model
from xtune.engine.trainer import Trainer
from xtune.errors import CheckpointSaveError, XtuneError
from xtune.methods import get_method, train
from xtune.parallel.distributed import init_distributed


@contextmanager
def writes_held(monkeypatch):
    """DCP's shard writes for `.tmp-step-N` wait until held[N] is set (by the test, or by itself release[N] seconds
    after the write began); fail[N] makes them fail with ENOSPC."""
    real = FileSystem.create_stream
    held, fail, release = {}, set(), {}

    @contextmanager
    def create_stream(self, path, mode):
        name = next((p for p in str(path).split(os.sep) if p.startswith(".tmp-step-")), None)
        step = int(name[len(".tmp-step-"):]) if name else None
        if step in held:
            assert threading.current_thread() is not threading.main_thread(), "an async write on the main thread"
            if step in release:
                threading.Timer(release.pop(step), held[step].set).start()
            assert held[step].wait(60), "the test never released the write"
        if step in fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with real(self, path, mode) as stream:
            yield stream

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    yield held, fail, release


def listing(tmp_path):
    ck = tmp_path / "checkpoints"
    return sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def test_async_save_writes_the_staged_state_in_the_background(init_dir, tmp_path, monkeypatch):  # noqa: F811
    spec = make_spec(init_dir, steps=6, keep_last=1, async_save=True)
    spec = dc.replace(spec, train=dc.replace(spec.train, global_batch_size=1))
    denv = init_distributed(spec.parallel)
    tr = None
    try:
        with writes_held(monkeypatch) as (held, fail, _):
            tr = Trainer(spec, tmp_path, method=get_method(spec), adapter=TinyAdapter(spec.model), tokenizer=None, denv=denv,
                         loader=ListLoader(6, 1, 0, 1, 1, seed=4))
            assert tr.checkpointer.async_save
            tr.train_step(next(tr.loader))
            tr.save()
            tr.checkpointer.wait()
            assert listing(tmp_path) == ["latest", "step-1"]

            # Step 2's write is held back: save() returns, training goes on and changes the weights.
            tr.train_step(next(tr.loader))
            saved = full_params(tr.model)
            held[2] = threading.Event()
            tr.save()
            assert listing(tmp_path) == [".tmp-step-2", "latest", "step-1"]  # keep_last=1 keeps step-1
            assert not (tmp_path / "checkpoints" / ".tmp-step-2" / "meta.json").exists()
            assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-1"
            tr.train_step(next(tr.loader))
            assert any(not torch.equal(saved[n], v) for n, v in full_params(tr.model).items())

            # At most one save in flight: step 3's save waits for step 2's write.
            held[3] = threading.Event()
            saver = threading.Thread(target=tr.save)
            saver.start()
            time.sleep(1.0)
            assert saver.is_alive() and not (tmp_path / "checkpoints" / ".tmp-step-3").exists()
            held[2].set()
            saver.join(60)
            assert not saver.is_alive()
            # keep_last=1 with step 3 in flight: step 2 (the last complete) stays, step 1 goes.
            assert listing(tmp_path) == [".tmp-step-3", "latest", "step-2"]
            # Step 2 holds the weights of the moment its save() returned, not the later ones (read through the
            # checksum-verifying loader into a plain model).
            model, _ = build_plain_model(TinyAdapter(spec.model), spec)
            load_model_only(tmp_path / "checkpoints" / "step-2", model)
            got = model.state_dict()
            assert all(torch.equal(saved[n], got[n]) for n in saved)
            held[3].set()
            tr.checkpointer.wait()
            assert listing(tmp_path) == ["latest", "step-3"] and read_marker(tmp_path / "checkpoints" / "step-3")

            # A background write that fails: reported at the next save, the previous checkpoint intact.
            tr.train_step(next(tr.loader))
            fail.add(4)
            tr.save()
            tr.train_step(next(tr.loader))
            with pytest.raises(CheckpointSaveError, match=r"saving checkpoint step 4 .*No space left on device.*"
                                                          r"the previous checkpoint .*step-3 is intact"):
                tr.save()
            assert listing(tmp_path) == ["latest", "step-3"]
    finally:
        if tr is not None:
            tr.checkpointer.close()
        denv.close()


def test_an_error_in_training_waits_for_the_save_in_flight(init_dir, tmp_path, monkeypatch):  # noqa: F811
    """Step 4 fails (a non-finite gradient with max_bad_steps=1) while step 3's save is still being written: the run
    stops with its error only after that save is complete, marker and `latest` included."""
    spec = make_spec(init_dir, steps=6, save_every=1, max_bad_steps=1, async_save=True)
    spec = dc.replace(spec, train=dc.replace(spec.train, global_batch_size=1))
    with writes_held(monkeypatch) as (held, _, release):
        held[3], release[3] = threading.Event(), 1.0  # written 1 s after it began: long after step 4 failed
        with pytest.raises(XtuneError, match="1 steps in a row had a non-finite gradient norm"):
            train(spec, tmp_path, adapter=TinyAdapter(spec.model, nan_at_steps={3}), tokenizer=None,
                  loader=ListLoader(6, 1, 0, 1, 1, seed=4))
        assert held[3].is_set()
    assert listing(tmp_path) == ["latest", "step-2", "step-3"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-3"
    assert read_marker(tmp_path / "checkpoints" / "step-3")["step"] == 3
