"""Atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP): the save (synchronous, or
staged to host memory and written in the background) and the load, resharded to any number of ranks.

A save goes to `.tmp-step-N`, gets its marker (`integrity.py`: the checksum of every file), is renamed to
`step-N`, and only then does `latest` move. A crash at any point therefore leaves the previous checkpoint
reachable and intact. Resume and export check every file against the marker's checksums before reading any
of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from xtune.checkpoint import integrity
from xtune.checkpoint.async_save import AsyncWriter
from xtune.checkpoint.integrity import (
    LATEST,
    MARKER,
    STATE,
    complete_checkpoints,
    corrupt_error,
    read_marker,
    read_state,
    resolve_resume,
    verify_checkpoint,
)
from xtune.errors import CheckpointError, CheckpointSaveError

log = logging.getLogger("xtune.engine")

# Re-exported: callers locate and check checkpoints through this module too.
__all__ = ["Checkpointer", "load_model_only", "read_marker", "read_state", "resolve_resume", "verify_checkpoint"]


# ----------------------------------------------------------------------------------------- errors


def _describe(error: BaseException) -> str:
    """One line per failure. DCP reports errors as CheckpointException (a BaseException, so `except
    Exception` misses it) whose str() is a full traceback per rank; keep only each rank's exception."""
    if isinstance(error, CheckpointException):
        parts = []
        for rank, failure in sorted(error.failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        return "; ".join(parts) or "CheckpointException"
    return f"{type(error).__name__}: {error}"


def _space_hint(root: Path, prev: str | None) -> str:
    """A full disk surfaces from torch's writer as e.g. "RuntimeError: unexpected pos ..." (the OSError is
    lost), so say so when the free space is below the size of the previous checkpoint."""
    try:
        free = shutil.disk_usage(root).free
        need = sum(f.stat().st_size for f in (root / prev).iterdir()) if prev else 0
    except OSError:
        return ""
    if free >= need and free > 0:
        return ""
    return (f"; the disk is (nearly) full: {free / 2**20:.0f} MiB free there, the previous checkpoint takes "
            f"{need / 2**20:.0f} MiB")


# ----------------------------------------------------------------------------------------- save / load


class Checkpointer:
    """Saves and loads a run's checkpoints. With `async_save` a save stages the state to CPU memory, returns, and
    writes in a background thread (DCP's async save) while training goes on; its marker and `latest` follow only
    when every rank's files are written and hashed. At most one save is in flight: the next one, `wait()` and
    `close()` block until it is complete."""

    def __init__(self, run_dir: Path, denv, keep_last: int, trainable_only: bool = False, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.denv = denv
        self.keep_last = keep_last
        # Adapter runs: frozen parameters are not saved (they are reloaded from the base model).
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        self.async_save = async_save
        self._pending = None  # the Future of the save in flight (background write, hashing, marker)
        if async_save:
            self._writer = AsyncWriter(denv.device)

    def _state_dicts(self, model, optimizer) -> dict:
        """What DCP saves and loads: the one place that decides which model/optimizer state a checkpoint holds."""
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def _apply_state_dicts(self, model, optimizer, state: dict) -> None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.options)

    def save(self, step: int, model, optimizer, state: dict, layout: dict | None = None) -> Path:
        """Collective: every rank writes its shards; rank 0 writes `state` (JSON) and finalises.

        `layout` (world size, batch split, ...) goes into the marker so a resume can say what changed.
        Raises CheckpointError on failure (of an async save: of the previous one, or at `wait()`).
        """
        self.wait()  # at most one save in flight
        denv = self.denv
        tmp, final = self.root / f".tmp-step-{step}", self.root / f"step-{step}"
        error = None
        if denv.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # leftover of an interrupted save
                tmp.mkdir()
            except OSError as e:
                error = e
        self._agree(error, step, tmp)
        try:
            if not self.async_save:
                dcp.save(self._state_dicts(model, optimizer), checkpoint_id=str(tmp))
            if denv.is_main:
                integrity.write_atomic(tmp / STATE, json.dumps(state))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must stop the same way
            error = e
        if not self.async_save:
            self._finish(error, step, tmp, final, layout)
            return final
        try:
            written = self._writer.start(self._state_dicts(model, optimizer), tmp)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            # Staging into host memory failed on this rank (out of memory): the other ranks' background writes
            # wait for this one's, so stop here and let the launcher stop them.
            raise CheckpointSaveError(f"saving checkpoint step {step} under {self.root} failed while copying the "
                                      f"state to host memory: {_describe(e)}") from e
        # Training continues; the background thread finishes this save on the checkpoint group.
        self._pending = self._writer.then(lambda: self._finish_written(written, error, step, tmp, final, layout))
        return final

    def wait(self) -> None:
        """Until the save in flight (if any) is complete, with its marker and `latest`; raises its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the save in flight, then release the background writer (idempotent)."""
        try:
            self.wait()
        finally:
            if self.async_save:
                self._writer.close()

    def _finish_written(self, written, error, step: int, tmp: Path, final: Path, layout: dict | None) -> None:
        try:
            written.result()  # DCP's background write of this rank's shards
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            error = error or e
        self._finish(error, step, tmp, final, layout, group=self._writer.group)

    def _finish(self, error, step: int, tmp: Path, final: Path, layout: dict | None, group=None) -> None:
        """Every file is written (or `error`): each rank hashes its share, rank 0 writes the marker, renames the
        folder, moves `latest` and prunes. Collective over `group` (the checkpoint group for an async save)."""
        denv = self.denv
        self._agree(error, step, tmp, group)
        digests = {}
        try:
            names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != MARKER)
            digests = integrity.digest_files(tmp, names[denv.rank::denv.world_size])
        except OSError as e:
            error = e
        self._agree(error, step, tmp, group)
        parts = [None] * denv.world_size
        torch.distributed.all_gather_object(parts, digests, group=group)
        if denv.is_main:
            try:
                files = {k: v for part in parts for k, v in part.items()}
                meta = {"step": step, "world_size": denv.world_size, "complete": True, "time": time.time(),
                        "layout": layout or {}, "files": dict(sorted(files.items()))}
                integrity.write_atomic(tmp / MARKER, json.dumps(meta, indent=1))
                old = None
                if final.exists():  # re-saving a step: move the old copy aside until the new one is in place
                    old = final.with_name(f".old-{final.name}")
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(final, old)
                os.rename(tmp, final)
                integrity.write_atomic(self.root / LATEST, final.name + "\n")
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                self._prune()
            except OSError as e:
                error = e
        self._agree(error, step, tmp, group)

    def _agree(self, error, step: int, tmp: Path, group=None) -> None:
        msg = None if error is None else _describe(error)
        msgs = [None] * self.denv.world_size
        torch.distributed.all_gather_object(msgs, msg, group=group)
        bad = [m for m in msgs if m]
        if bad:
            if self.denv.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else None
            kept = f"; the previous checkpoint {self.root / prev} is intact" if prev else ""
            raise CheckpointSaveError(f"saving checkpoint step {step} under {self.root} failed: {bad[0]}{kept}"
                                  f"{_space_hint(self.root, prev)}")

    def _prune(self) -> None:
        """Keep the newest keep_last complete checkpoints. Only `step-N` folders count: the one being written is
        still `.tmp-step-N`, and the one just finished (the newest) is always kept."""
        if self.keep_last <= 0:
            return
        for _, old in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def verify(self, ckpt: Path, meta: dict) -> None:
        """Collective: every rank checks its share of the files; any mismatch fails every rank, naming it."""
        d = self.denv
        mine = verify_checkpoint(ckpt, meta, d.rank, d.world_size)
        parts = [None] * d.world_size
        torch.distributed.all_gather_object(parts, mine)
        problems = [p for part in parts for p in part]
        if problems:
            raise corrupt_error(ckpt, problems)

    def load(self, ckpt: Path, model, optimizer) -> dict:
        """Verify, load model+optimizer (resharded as needed) and return the run's global state."""
        meta = read_marker(ckpt)
        # Any number of ranks: DCP reshards the weights and the optimizer, and the run state is global.
        self.verify(ckpt, meta)
        try:
            run_state = read_state(ckpt, meta)  # first: it is small and the likelier to be refused
            state = self._state_dicts(model, optimizer)
            dcp.load(state, checkpoint_id=str(ckpt))
            self._apply_state_dicts(model, optimizer, state)
            return run_state
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"checkpoint {ckpt} could not be loaded: {_describe(e)}") from e


def load_model_only(ckpt: Path, model, trainable_only: bool = False) -> dict:
    """Load just the weights into a plain (unsharded, single-process) model, e.g. for export.
    trainable_only: the checkpoint of an adapter run, which holds only the parameters that train."""
    meta = read_marker(ckpt)
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    problems = verify_checkpoint(ckpt, meta)
    if problems:
        raise corrupt_error(ckpt, problems)
    try:
        sd = {"model": get_model_state_dict(model, options=options)}
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(ckpt))
        set_model_state_dict(model, sd["model"], options=options)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {ckpt} could not be loaded: {_describe(e)}") from e
    return meta
