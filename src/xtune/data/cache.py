"""On-disk cache of tokenised datasets, and the lock that lets one process build it.

Key: content hash of every file, hash of the tokenizer (its full serialised vocabulary,
merges, added tokens), the template and the length / image settings. A cache entry is a
folder written under a temporary name and renamed into place, so readers never see a partial
one. In a multi-rank run every rank calls `build_or_load`; the first to create the lock file
builds, the others poll the filesystem until the entry appears. There is no collective, so no
NCCL / gloo timeout while a large dataset is tokenised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from xtune.data.types import ImageRef

FORMAT_VERSION = 1
STALE_LOCK_S = 600.0  # a lock not refreshed for this long belongs to a dead builder


def default_cache_dir(cache_dir: Optional[str] = None) -> Path:
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


def cache_key(files: List[str], tokenizer_digest: str, settings, media_root: Optional[str], on_error: str) -> str:
    h = hashlib.sha256()
    h.update(f"xtune-data-v{FORMAT_VERSION}".encode())
    for f in files:
        h.update(file_hash(f).encode())
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
    try:
        os.rename(tmp, folder)
    except OSError:  # another process won the race with an identical entry
        shutil.rmtree(tmp, ignore_errors=True)


def load_entry(folder: Path) -> dict:
    info = json.loads((folder / "meta.json").read_text())
    info["ids"] = np.load(folder / "ids.npy", mmap_mode="r")
    info["labels"] = np.load(folder / "labels.npy", mmap_mode="r")
    info["offsets"] = np.load(folder / "offsets.npy")
    info["images"] = [[ImageRef(**im) for im in ims] for ims in info["images"]]
    return info


# -- build once, across processes --------------------------------------------------------------------
def build_or_load(folder: Path, build: Callable[[], None], poll_s: float = 0.5,
                  timeout_s: Optional[float] = None) -> bool:
    """Make sure the entry `folder` exists; returns True when this process built it.

    `build()` must write the entry with `save_entry`. While it runs, a thread refreshes the
    lock's mtime so that waiting processes know the builder is alive.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(folder.name + ".lock")
    start = time.monotonic()
    while True:
        if (folder / "meta.json").exists():
            return False
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                    lock.unlink(missing_ok=True)  # its builder died without cleaning up
                    continue
            except FileNotFoundError:
                continue
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f}s for another process to build {folder}") from None
            time.sleep(poll_s)
            continue
        try:
            os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
            os.close(fd)
            if (folder / "meta.json").exists():  # finished between our check and our lock
                return False
            done = threading.Event()
            beat = threading.Thread(target=_heartbeat, args=(lock, done), daemon=True)
            beat.start()
            try:
                build()
            finally:
                done.set()
                beat.join()
            return True
        finally:
            lock.unlink(missing_ok=True)


def _heartbeat(lock: Path, done: threading.Event) -> None:
    while not done.wait(STALE_LOCK_S / 10):
        try:
            os.utime(lock)
        except FileNotFoundError:
            return
