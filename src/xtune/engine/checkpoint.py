"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run directory's `checkpoints/`:
    step-N/              one complete checkpoint
        .metadata, *.distcp   DCP shards of {"model", "optim"} (resharded on load)
        extra-rank{R}.pt      per-rank state: LR schedule, data loader, RNG, counters
        meta.json             completion marker, written last
    latest               text file naming the newest complete folder, replaced atomically last

A save goes to `.tmp-step-N`, gets its marker, is renamed to `step-N`, and only then does `latest`
move. A crash at any point therefore leaves the previous checkpoint reachable and intact, and a
folder without a readable marker is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from xtune.errors import CheckpointError

MARKER = "meta.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------- locating


def read_marker(ckpt: Path) -> dict:
    """The checkpoint's metadata; CheckpointError if the folder is not a complete checkpoint."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    marker = ckpt / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {MARKER}): the save was interrupted; "
                              "delete it or resume from an earlier one")
    try:
        meta = json.loads(marker.read_text())
        step, world = int(meta["step"]), int(meta["world_size"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable {MARKER} ({e})") from None
    if not meta.get("complete"):
        raise CheckpointError(f"checkpoint {ckpt} is not marked complete")
    absent = [n for n in [".metadata"] + [f"extra-rank{r}.pt" for r in range(world)] if not (ckpt / n).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: missing {', '.join(absent)}")
    meta["step"] = step
    return meta


def complete_checkpoints(root: Path) -> list:
    """(step, folder) of the `step-N` folders under `root`, oldest first (without validating them)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from (validated), or None to start fresh.

    `auto` uses `run_dir/checkpoints/latest` (or the newest step-N when `latest` was never written,
    i.e. a crash between the rename and the pointer update); a PATH may be a checkpoint folder, a
    `checkpoints/` folder or a run directory.
    """
    if not resume:
        return None
    if resume == "auto":
        root = Path(run_dir) / "checkpoints"
        if not (root / LATEST).is_file() and not complete_checkpoints(root):
            return None
        return _pick(root)
    path = Path(resume).expanduser()
    if (path / MARKER).exists() or _STEP_RE.match(path.name):
        read_marker(path)
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file() or complete_checkpoints(root):
            return _pick(root)
    raise CheckpointError(f"train.resume={resume}: no checkpoint found there")


def _pick(root: Path) -> Path:
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        ckpt = root / name
        read_marker(ckpt)
        return ckpt
    _, ckpt = complete_checkpoints(root)[-1]
    read_marker(ckpt)
    return ckpt


# ----------------------------------------------------------------------------------------- state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- save / load


class Checkpointer:
    def __init__(self, run_dir: Path, denv, keep_last: int, trainable_only: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.denv = denv
        self.keep_last = keep_last
        # Adapter runs: frozen parameters are not saved (they are reloaded from the base model).
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def save(self, step: int, model, optimizer, extra: dict) -> Path:
        """Collective: every rank writes its shards; rank 0 finalises. Raises CheckpointError on failure."""
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
            model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            torch.save(extra, tmp / f"extra-rank{denv.rank}.pt")
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must stop the same way
            error = e
        self._agree(error, step, tmp)
        if denv.is_main:
            try:
                meta = {"step": step, "world_size": denv.world_size, "complete": True, "time": time.time()}
                _write_atomic(tmp / MARKER, json.dumps(meta))
                old = None
                if final.exists():  # re-saving a step: move the old copy aside until the new one is in place
                    old = final.with_name(f".old-{final.name}")
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(final, old)
                os.rename(tmp, final)
                _write_atomic(self.root / LATEST, final.name + "\n")
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                self._prune()
            except OSError as e:
                error = e
        self._agree(error, step, tmp)
        return final

    def _agree(self, error, step: int, tmp: Path) -> None:
        msg = None if error is None else _describe(error)
        msgs = [None] * self.denv.world_size
        torch.distributed.all_gather_object(msgs, msg)
        bad = [m for m in msgs if m]
        if bad:
            if self.denv.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else None
            kept = f"; the previous checkpoint {self.root / prev} is intact" if prev else ""
            raise CheckpointError(f"saving checkpoint step {step} under {self.root} failed: {bad[0]}{kept}"
                                  f"{_space_hint(self.root, prev)}")

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, old in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, ckpt: Path, model, optimizer) -> dict:
        """Load model+optimizer (resharded as needed) and return this rank's extra state."""
        meta = read_marker(ckpt)
        if meta["world_size"] != self.denv.world_size:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {meta['world_size']} ranks, this run has "
                f"{self.denv.world_size}: the data loader and RNG state are per rank, so resume with the same "
                f"number of processes (the weights alone can be exported with `xtune export`)")
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(ckpt))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=self.options)
            return torch.load(ckpt / f"extra-rank{self.denv.rank}.pt", weights_only=False)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"checkpoint {ckpt} could not be loaded: {_describe(e)}") from e


def load_model_only(ckpt: Path, model, trainable_only: bool = False) -> dict:
    """Load just the weights into a plain (unsharded, single-process) model, e.g. for export.
    trainable_only: the checkpoint of an adapter run, which holds only the parameters that train."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    meta = read_marker(ckpt)
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    try:
        sd = {"model": get_model_state_dict(model, options=options)}
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(ckpt))
        set_model_state_dict(model, sd["model"], options=options)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {ckpt} could not be loaded: {_describe(e)}") from e
    return meta
