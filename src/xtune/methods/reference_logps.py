"""Reference log-probs of a preference run: computed once, before training, by the initial weights.

Every rank computes its share of the pairs (packed as in training), the results are combined with one
all_reduce (MAX over a -inf filled [pairs, 2] table: exact, whoever computed a pair), and rank 0 writes
the table to <run_dir>/reference/<split>-<key>.npy. The key hashes the data (files, tokenizer, data
settings) and the model (spec, weight files, compute dtype, seed of a random init): a resumed run, or a
new run on the same data and model (through the copy in the data cache folder), reads the table instead
of recomputing it. With adapters the reference is the base: the adapter layers are disabled meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from xtune.config.schema import RunSpec
from xtune.data import cache
from xtune.data.cache import default_cache_dir
from xtune.data.records import list_files

log = logging.getLogger("xtune.engine")


def reference_key(spec: RunSpec, tokenizer, compute_dtype) -> str:
    h = hashlib.sha256(b"xtune-reference-v1")
    for ds in list(spec.data.datasets) + list(spec.data.eval_datasets):
        for f in list_files(ds.path):
            h.update(cache.file_hash(f).encode())
        h.update(json.dumps(dataclasses.asdict(ds), sort_keys=True).encode())
    h.update(cache.tokenizer_hash(tokenizer).encode() if tokenizer is not None else b"")
    d = dataclasses.asdict(spec.data)
    for k in ("datasets", "eval_datasets", "cache_dir", "num_workers"):
        d.pop(k)
    m = dataclasses.asdict(spec.model)
    h.update(json.dumps({"data": d, "model": m, "dtype": str(compute_dtype), "quantize": spec.peft.quantize,
                         "seed": None if spec.model.load_from else spec.train.seed}, sort_keys=True,
                        default=str).encode())
    if spec.model.load_from:  # the weights themselves: names, sizes and times of the folder's files
        folder = Path(spec.model.load_from).expanduser()
        for f in sorted(folder.glob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json"):
                st = f.stat()
                h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model's outputs: every peft adapter layer off (peft's public BaseTunerLayer.enable_adapters,
    checked with peft 0.21), restored after."""
    try:  # lazy: peft is a heavy import only adapter runs need
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


@torch.no_grad()
def compute(root, batches: list, denv, device, num_pairs: int) -> torch.Tensor:
    """[num_pairs, 2] float64 (chosen, rejected) log-prob sums, the same on every rank."""
    table = torch.full((num_pairs, 2), float("-inf"), dtype=torch.float64, device=device)
    was_training = root.training
    root.eval()  # no dropout in the reference
    try:
        for mb in batches:
            mb = mb.to(device)
            logps = root(mb, logps_only=True)
            if mb.num_pairs:
                table[mb.pair_ids] = logps.double()
    finally:
        root.train(was_training)
        if hasattr(root, "reshard"):
            root.reshard()
    table = table.to(denv.comm_device)
    torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.MAX)
    return table.to(device)


def _write(path: Path, table: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, table.cpu().numpy())
    os.replace(tmp, path)


def reference_logps(trainer, method) -> dict[str, torch.Tensor]:
    spec, d = trainer.spec, trainer.denv
    key = reference_key(spec, trainer.tokenizer, trainer.compute_dtype)
    splits = {"train": (lambda: trainer.loader.reference_batches(d.rank, d.dp_size), trainer.loader.num_pairs)}
    if trainer.eval_batches:
        eval_pairs = max([int(mb.pair_ids.max()) + 1 for mb in trainer.eval_batches if mb.num_pairs] or [0])
        n = torch.tensor([eval_pairs], dtype=torch.float64, device=d.comm_device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        splits["eval"] = (lambda: trainer.eval_batches, int(n.item()))
    shared = default_cache_dir(spec.data.cache_dir) / "reference"
    out = {}
    for split, (batches, num_pairs) in splits.items():
        name = f"{split}-{key}.npy"
        path = trainer.run_dir / "reference" / name
        found = path if path.is_file() else shared / name if (shared / name).is_file() else None
        if found is not None:
            table = torch.from_numpy(np.load(found, allow_pickle=False))
            if table.shape == (num_pairs, 2):
                if d.is_main:
                    log.info("reference log-probs (%s, %d pairs) read from %s", split, num_pairs, found)
                    if found != path:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(found, path)
                out[split] = table.to(trainer.device)
                continue
        if d.is_main:
            log.info("computing the reference log-probs of %d %s pairs with the initial weights", num_pairs, split)
        with adapters_disabled(trainer.model) if trainer.peft else contextlib.nullcontext():
            table = compute(trainer.root, batches(), d, trainer.device, num_pairs)
        if not torch.isfinite(table).all():
            raise RuntimeError(f"reference log-probs: {int((~torch.isfinite(table)).any(1).sum())} {split} pair(s) "
                               "were not computed by any rank")
        if d.is_main:
            _write(path, table)
            with contextlib.suppress(OSError):  # the shared copy is an optimisation only
                _write(shared / name, table)
        d.barrier()
        out[split] = table
    return out
