"""Atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run directory's `checkpoints/`:
    step-N/              one complete checkpoint
        .metadata, *.distcp   DCP shards of {"model", "optim"} (resharded on load)
        state.json            the run's global state: LR schedule, data position, counters (no pickle)
        meta.json             completion marker with a checksum (xxh3_128) of every other file, written last
    latest               text file naming the newest complete folder, replaced atomically last

A save goes to `.tmp-step-N`, gets its marker, is renamed to `step-N`, and only then does `latest`
move. A crash at any point therefore leaves the previous checkpoint reachable and intact, and a
folder without a readable marker is never loaded. Resume and export check every file against the
marker's checksums before reading any of it; loading never unpickles anything.

Checkpoints of older xtune versions (per-rank `extra-rank{R}.pt`, no checksums) still load, with a
warning; their `.pt` files are read with `torch.load(weights_only=True)`, which runs no code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from xtune.errors import CheckpointError, CheckpointSaveError

log = logging.getLogger("xtune.engine")

MARKER = "meta.json"
STATE = "state.json"
LATEST = "latest"
LEGACY_EXTRA = "extra-rank{rank}.pt"  # per-rank pickled state of xtune <= 0.x checkpoints (read safely)
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
    if "files" in meta:
        needed = [".metadata", STATE, *meta["files"]]
    else:  # an older xtune: per-rank pickled state, no checksums
        needed = [".metadata"] + [LEGACY_EXTRA.format(rank=r) for r in range(world)]
    absent = [n for n in dict.fromkeys(needed) if not (ckpt / n).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: missing {', '.join(absent)}")
    meta["step"] = step
    return meta


# ----------------------------------------------------------------------------------------- checksums

_CHUNK = 8 << 20
_HASH_THREADS = 8  # the hashers release the GIL on large buffers: the threads hash files in parallel
# The checksum of new markers: xxh3_128 hashes ~6x faster than sha256 here (3.4 against 0.53 GB/s on one core),
# which is most of a synchronous save's hashing and of a resume's verification. Markers written with sha256
# (xtune before it) are still verified with sha256.
HASH = "xxh3_128"
_HASHERS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def file_digest(path: Path, algo: str = HASH) -> dict:
    h = _HASHERS[algo]()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {algo: h.hexdigest(), "bytes": size}


def digest_files(folder: Path, names: list) -> dict:
    """{name: {xxh3_128, bytes}} of `names` under `folder`, hashed in parallel threads."""
    if not names:
        return {}
    with ThreadPoolExecutor(min(_HASH_THREADS, len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(folder / n), names)))


def checksum_problems(ckpt: Path, expected: dict, names: list) -> list:
    """One message per file of `names` whose size or checksum differs from `expected` (the marker's)."""
    problems = []

    def check(name):
        want = expected[name]
        algo = next((a for a in _HASHERS if a in want), None)
        if algo is None:
            return f"{name} has no checksum xtune knows ({', '.join(k for k in want if k != 'bytes')})"
        try:
            size = (ckpt / name).stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, expected {want['bytes']} (truncated or replaced)"
            got = file_digest(ckpt / name, algo)[algo]
        except OSError as e:
            return f"{name} cannot be read ({e})"
        return None if got == want[algo] else f"{name} does not match its {algo} checksum (changed on disk)"

    if names:
        with ThreadPoolExecutor(min(_HASH_THREADS, len(names))) as pool:
            problems = [p for p in pool.map(check, names) if p]
    return problems


def verify_checkpoint(ckpt: Path, meta: dict | None = None, rank: int = 0, world: int = 1) -> list:
    """This rank's share of the checksum check (every file when world == 1): a list of problems.

    A checkpoint from an older xtune has no checksums: [] and a warning (it is loaded unverified).
    """
    meta = meta if meta is not None else read_marker(ckpt)
    files = meta.get("files")
    if files is None:
        if rank == 0:
            msg = (f"checkpoint {ckpt} has no checksums (written by an older xtune): "
                   "loading it without verifying its files")
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
        return []
    return checksum_problems(ckpt, files, sorted(files)[rank::world])


def corrupt_error(ckpt: Path, problems: list) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt} is corrupt: {'; '.join(problems)}; "
                           "resume from an earlier checkpoint (train.resume=PATH) or delete this one")


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
            from xtune.checkpoint.async_save import AsyncWriter

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
                _write_atomic(tmp / STATE, json.dumps(state))
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
            digests = digest_files(tmp, names[denv.rank::denv.world_size])
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
                _write_atomic(tmp / MARKER, json.dumps(meta, indent=1))
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


def read_state(ckpt: Path, meta: dict) -> dict:
    """The global run state: state.json, or rank 0's pickled extra state of an older checkpoint read with
    weights_only=True (tensors, containers and numbers only; numpy's RNG arrays allow-listed)."""
    if "files" in meta or (ckpt / STATE).is_file():
        try:
            return json.loads((ckpt / STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: {STATE} is unreadable ({e})") from None
    import numpy as np

    # torch 2.13's weights-only unpickler rebuilds numpy arrays only through these allow-listed globals
    # (numpy's RNG state inside the old files); nothing else is importable, no code runs.
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    name = LEGACY_EXTRA.format(rank=0)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(ckpt / name, weights_only=True)
    except pickle.UnpicklingError as e:
        first = next((line for line in str(e).splitlines() if "Unsupported" in line), "").strip()
        raise CheckpointError(f"checkpoint {ckpt}: {name} holds objects other than tensors, numbers and containers "
                              f"({first or 'not a weights-only file'}); xtune never unpickles those") from None


def load_model_only(ckpt: Path, model, trainable_only: bool = False) -> dict:
    """Load just the weights into a plain (unsharded, single-process) model, e.g. for export.
    trainable_only: the checkpoint of an adapter run, which holds only the parameters that train."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

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
