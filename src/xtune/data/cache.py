"""On-disk cache of tokenised datasets, and the lock that lets one process build it.

Key: content hash of every file (hashed once per version of a file, see `content_hash`), hash of
the tokenizer (its full serialised vocabulary, merges, added tokens), the template and the length /
image settings. A cache entry is a
folder written under a temporary name and renamed into place, so readers never see a partial
one. In a multi-rank run every rank calls `build_or_load`; the first to take the file lock
builds, the others wait on the lock and then find the entry. There is no collective, so no
NCCL / gloo timeout while a large dataset is tokenised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from xtune.data.types import ImageRef

FORMAT_VERSION = 1


def default_cache_dir(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("XTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xtune" / "data"


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        # A Python tokenizer: its vocabulary, and its class and files (code, merges, sentencepiece
        # models), which decide the tokens as much as the vocabulary does.
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(type(tokenizer).__qualname__.encode())
        folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
        names = set(getattr(tokenizer, "vocab_files_names", {}).values()) | {"tokenizer_config.json"}
        if folder.is_dir():
            for f in sorted(p for p in folder.iterdir() if p.is_file() and (p.name in names or p.suffix == ".py")):
                h.update(f.name.encode() + file_hash(str(f)).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list:
    # ctime and inode too: a copy that keeps the mtime (cp -p, rsync -a) or a file renamed into place
    # still changes them, and the user cannot set either.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def content_hash(path: str, memo_dir: Path | None) -> str:
    """sha256 of a data file, hashed once per version of the file: the hash is stored under `memo_dir`
    with the file's (size, mtime, ctime, inode), and read back while those are unchanged. Processes that
    start together (every rank of a run) wait on one lock per file while the first hashes it."""
    if memo_dir is None:
        return file_hash(path)
    real = os.path.realpath(path)
    memo = memo_dir / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")

    def stored() -> str | None:
        try:
            m = json.loads(memo.read_text())
        except (OSError, ValueError):
            return None
        return m.get("sha256") if m.get("path") == real and m.get("stat") == _stat_key(os.stat(real)) else None

    digest = stored()
    if digest is not None:
        return digest
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache: hash without a memo; writing the entry reports the folder
        return file_hash(real)
    with FileLock(str(memo) + ".lock"):
        digest = stored()  # hashed by another process while this one waited
        if digest is None:
            before = _stat_key(os.stat(real))  # a change while hashing leaves a stale stat: hashed again
            digest = file_hash(real)
            tmp = memo.with_name(f"{memo.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"path": real, "stat": before, "sha256": digest}))
            os.replace(tmp, memo)
    return digest


def cache_key(files: list[str], tokenizer_digest: str, settings, media_root: str | None, on_error: str,
              memo_dir: Path | None = None) -> str:
    """The entry's name: content hashes of the files (see `content_hash`), the tokenizer and settings."""
    h = hashlib.sha256()
    h.update(f"xtune-data-v{FORMAT_VERSION}".encode())
    for f in files:
        h.update(content_hash(f, memo_dir).encode())
    h.update(tokenizer_digest.encode())
    h.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    h.update(f"{media_root}|{on_error}".encode())
    return h.hexdigest()[:32]


# -- storage ---------------------------------------------------------------------------------------
def save_entry(folder: Path, chunk, meta: dict) -> None:
    """Write a TokenizedChunk atomically to `folder`."""
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_entry(tmp, chunk, meta)
    except BaseException:  # a full disk or a kill: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, folder)
    except OSError:  # another process won the race with an identical entry
        shutil.rmtree(tmp, ignore_errors=True)


def _write_entry(tmp: Path, chunk, meta: dict) -> None:
    lengths = np.array([len(x) for x in chunk.ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32)  # noqa: E731
    np.save(tmp / "ids.npy", cat(chunk.ids))
    np.save(tmp / "labels.npy", cat(chunk.labels))
    np.save(tmp / "offsets.npy", offsets)
    info = dict(
        meta,
        sources=chunk.sources,
        images=[[dataclasses.asdict(im) for im in ims] for ims in chunk.images],
        records=chunk.records,
        truncated=chunk.truncated,
        dropped_image_cut=chunk.dropped_image_cut,
        dropped_no_loss=chunk.dropped_no_loss,
        errors=chunk.errors,
    )
    (tmp / "meta.json").write_text(json.dumps(info, ensure_ascii=False))


def load_entry(folder: Path) -> dict:
    info = json.loads((folder / "meta.json").read_text())
    info["ids"] = np.load(folder / "ids.npy", mmap_mode="r")
    info["labels"] = np.load(folder / "labels.npy", mmap_mode="r")
    info["offsets"] = np.load(folder / "offsets.npy")
    info["images"] = [[ImageRef(**im) for im in ims] for ims in info["images"]]
    return info


# -- build once, across processes --------------------------------------------------------------------
def build_or_load(folder: Path, build: Callable[[], None], poll_s: float = 0.5,
                  timeout_s: float | None = None) -> bool:
    """Make sure the entry `folder` exists; returns True when this process built it.

    `build()` must write the entry with `save_entry`. The lock is filelock's (an OS file lock), so the
    kernel releases it when its holder dies: a killed builder never leaves the others waiting.
    """
    if (folder / "meta.json").exists():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.with_name(folder.name + ".lock")
    lock = FileLock(str(lock_path), timeout=-1 if timeout_s is None else timeout_s)
    try:
        with lock.acquire(poll_interval=poll_s):
            built = not (folder / "meta.json").exists()  # else: built while we waited
            if built:
                build()
    except Timeout:
        raise TimeoutError(f"waited {timeout_s:.0f}s for another process to build {folder}") from None
    # Safe to remove: whoever takes the lock from here on finds meta.json and builds nothing.
    lock_path.unlink(missing_ok=True)
    return built
