"""Which checkpoint folders are complete and intact: the completion marker (`meta.json`: step, world size,
layout, the xxh3_128 checksum and size of every other file), the `latest` pointer, the choice of the folder
to resume from, the checksum check, and the run state (`state.json`). No DCP here: `dcp.py` saves and loads
the shards and writes through these.

Layout of a run directory's `checkpoints/`:
    step-N/              one complete checkpoint
        .metadata, *.distcp   DCP shards of {"model", "optim"} (resharded on load)
        state.json            the run's global state: LR schedule, data position, counters, spec (no pickle)
        meta.json             completion marker with a checksum of every other file, written last
    latest               text file naming the newest complete folder, replaced atomically last

A folder without a readable marker, or with a file that is missing or differs from its checksum, is never
loaded; loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from xtune.errors import CheckpointError

MARKER = "meta.json"
STATE = "state.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")


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
        step, meta["world_size"] = int(meta["step"]), int(meta["world_size"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable {MARKER} ({e})") from None
    if not meta.get("complete"):
        raise CheckpointError(f"checkpoint {ckpt} is not marked complete")
    if not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"checkpoint {ckpt}: its {MARKER} lists no files with checksums (not a checkpoint "
                              "this xtune wrote)")
    needed = [".metadata", STATE, *meta["files"]]
    absent = [n for n in dict.fromkeys(needed) if not (ckpt / n).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: missing {', '.join(absent)}")
    meta["step"] = step
    return meta


# ----------------------------------------------------------------------------------------- checksums

_CHUNK = 8 << 20
_HASH_THREADS = 8  # the hasher releases the GIL on large buffers: the threads hash files in parallel
# The checksum: xxh3_128, much faster than a cryptographic hash (it guards against damage, not against an
# attacker, who could rewrite the marker too); bench/README.md has the measured rates.
HASH = "xxh3_128"


def file_digest(path: Path) -> dict:
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {HASH: h.hexdigest(), "bytes": size}


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
        if not isinstance(want, dict) or HASH not in want or "bytes" not in want:
            return f"{name} has no {HASH} checksum in the marker"
        try:
            size = (ckpt / name).stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, expected {want['bytes']} (truncated or replaced)"
            got = file_digest(ckpt / name)[HASH]
        except OSError as e:
            return f"{name} cannot be read ({e})"
        return None if got == want[HASH] else f"{name} does not match its {HASH} checksum (changed on disk)"

    if names:
        with ThreadPoolExecutor(min(_HASH_THREADS, len(names))) as pool:
            problems = [p for p in pool.map(check, names) if p]
    return problems


def verify_checkpoint(ckpt: Path, meta: dict | None = None, rank: int = 0, world: int = 1) -> list:
    """This rank's share of the checksum check (every file when world == 1): a list of problems."""
    meta = meta if meta is not None else read_marker(ckpt)
    files = meta["files"]
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


def read_state(ckpt: Path, meta: dict) -> dict:
    """The run's global state (state.json; never a pickle)."""
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {STATE} is unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {ckpt}: {STATE} is not a JSON object")
    return state


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
