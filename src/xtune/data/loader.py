"""The training loader (deterministic, resumable, sharded over data-parallel ranks) and eval batches.

Rows are packed once from the seeded-shuffled mix. Each epoch visits the rows in a fresh
permutation drawn from (seed, epoch); step k of an epoch takes rows [k*G, (k+1)*G) of it
(G = global_batch_size, the last step of an epoch wrapping around to its start so no row is
left out). Of a step's G rows, rank r takes the contiguous block r*A*M .. (r+1)*A*M (A = grad
accumulation, M = micro_batch_size) as A micro-batches of M rows. A step is thus a pure function
of (seed, step), which makes `state_dict()` just the step counter.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from xtune.config.schema import RunSpec
from xtune.data import cache
from xtune.data.batch import collate, image_tiles_fn
from xtune.data.dataset import TokenizedDataset, load_dataset
from xtune.data.mix import mix
from xtune.data.pack import Row, efficiency, pack, rows_fingerprint
from xtune.data.records import count_kinds
from xtune.data.types import PackedBatch
from xtune.errors import DataError

log = logging.getLogger("xtune.data")


@dataclass
class DataStats:
    datasets: list[dict] = field(default_factory=list)  # per dataset: counts (see `dataset_stats`)
    samples: int = 0  # after mixing
    rows: int = 0
    real_tokens: int = 0
    trained_tokens: int = 0
    packing_efficiency: float = 0.0


def _trained_tokens(datasets: list[TokenizedDataset], items: np.ndarray) -> int:
    """Trained tokens over the mixed items (a sample drawn k times counts k times)."""
    total = 0
    for d, ds in enumerate(datasets):
        picked = items[items[:, 0] == d, 1]
        if len(picked):
            csum = np.concatenate([[0], np.cumsum(np.asarray(ds.labels) != -100)])
            total += int((csum[ds.offsets[picked + 1]] - csum[ds.offsets[picked]]).sum())
    return total


def dataset_stats(ds: TokenizedDataset) -> dict:
    return dict(
        name=ds.name, files=len(ds.files), records=ds.records, samples=len(ds), tokens=ds.num_tokens,
        trained_tokens=ds.num_trained, truncated=ds.truncated, dropped_image_cut=ds.dropped_image_cut,
        dropped_no_loss=ds.dropped_no_loss, skipped=len(ds.errors), skipped_kinds=count_kinds(ds.errors),
        errors=ds.errors[:5],
    )


class PackedData:
    """Datasets mixed and packed into rows; builds the PackedBatch of any rows.

    An item is a sample, or for preference data (`spec.method == "dpo"`) a pair of samples: the packer places
    whole pairs, and each pair becomes two consecutive documents of its row (chosen, rejected)."""

    def __init__(self, ds_specs, spec: RunSpec, tokenizer, *, shuffle: bool, verbose: bool):
        data, model = spec.data, spec.model
        preference = getattr(spec, "method", "sft") == "dpo"
        self.group = 2 if preference else 1
        digest = cache.tokenizer_hash(tokenizer)
        self.datasets = [
            load_dataset(d, tokenizer, data, model, tokenizer_digest=digest, verbose=verbose, preference=preference)
            for d in ds_specs
        ]
        # Pair ids are unique over the datasets (a pair drawn twice by the mix keeps its id).
        self.pair_base = np.concatenate([[0], np.cumsum([d.num_items for d in self.datasets])]).astype(np.int64)
        self.items = mix([d.num_items for d in self.datasets], [d.sample_ratio for d in ds_specs], spec.train.seed)
        if shuffle:
            order = np.random.default_rng([spec.train.seed, 0xD47A]).permutation(len(self.items))
            self.items = self.items[order]
        lengths = [self.item_length(d, i) for d, i in self.items]
        blocks = {}
        if data.pack == "hard":
            for k, (d, i) in enumerate(self.items):
                ims = self.datasets[d].images[i]
                if ims:
                    blocks[k] = [(im.token_start, im.token_start + im.num_tokens) for im in ims]
        self.row_len = data.pack_max_length
        self.strategy, self.lookahead = data.pack, data.pack_lookahead
        self.rows: list[Row] = pack(data.pack, lengths, self.row_len, data.pack_lookahead, blocks)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.tiles = image_tiles_fn(model)
        self.stats = DataStats(
            datasets=[dataset_stats(d) for d in self.datasets],
            samples=len(self.items),
            rows=len(self.rows),
            real_tokens=int(sum(lengths)),
            trained_tokens=_trained_tokens(self.datasets, self._sample_items(self.items)),
            packing_efficiency=efficiency(self.rows, self.row_len),
        )

    def item_length(self, d: int, i: int) -> int:
        offsets, g = self.datasets[d].offsets, self.group
        return int(offsets[g * i + g] - offsets[g * i])

    def _sample_items(self, items: np.ndarray) -> np.ndarray:
        """(dataset, sample) of every document of `items` (a pair's two samples in order)."""
        if self.group == 1:
            return items
        out = np.repeat(items, 2, axis=0)
        out[:, 1] = out[:, 1] * 2 + np.tile([0, 1], len(items))
        return out

    def item(self, k: int):
        """ids, labels and images of document k (for pairs: half k % 2 of item k // 2)."""
        d, i = self.items[k // self.group]
        return self._sample(int(d), int(i) * self.group + k % self.group)

    def _sample(self, d: int, j: int):
        ds = self.datasets[d]
        a, b = int(ds.offsets[j]), int(ds.offsets[j + 1])
        return ds.ids[a:b], ds.labels[a:b], ds.images[j]

    def batch(self, row_ids: list[int]) -> PackedBatch:
        return self._collate([self.rows[r] for r in row_ids], self.items, self.item)

    def _collate(self, rows: list[Row], items: np.ndarray, item) -> PackedBatch:
        if self.group == 1:
            return collate(rows, item, self.row_len, self.pad_id, self.tiles)
        docs = [[(2 * i + h, 0, len(item(2 * i + h)[0])) for i, _, _ in row for h in (0, 1)] for row in rows]
        batch = collate(docs, item, self.row_len, self.pad_id, self.tiles)
        pairs = [int(i) for row in rows for i, _, _ in row]
        batch.pair_docs = torch.arange(2 * len(pairs), dtype=torch.long).view(-1, 2)
        batch.pair_ids = torch.tensor([int(self.pair_base[items[i][0]] + items[i][1]) for i in pairs],
                                      dtype=torch.long)
        return batch

    def empty_batch(self, num_rows: int) -> PackedBatch:
        """Padding only: no trained token (keeps ranks in step during eval)."""
        return self._collate([[] for _ in range(num_rows)], self.items, self.item)

    @property
    def num_pairs(self) -> int:
        return int(self.pair_base[-1])

    def all_batches(self, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[PackedBatch]:
        """Every row once, split over ranks like eval batches (the rows training sees, so a pair's reference
        log-probs come from the same packed row as its training forward)."""
        return _rank_batches(len(self.rows), dp_rank, dp_size, micro_batch_size, self.batch,
                             lambda: self.empty_batch(micro_batch_size))

    def fingerprint(self) -> str:
        return hashlib.sha256(rows_fingerprint(self.rows).tobytes() + self.items.tobytes()).hexdigest()[:16]


def _rank_batches(n_rows: int, dp_rank: int, dp_size: int, m: int, make, empty) -> list[PackedBatch]:
    """Rows r = dp_rank (mod dp_size) in micro-batches of m rows; every rank gets the same number of
    batches (padded with empty ones), so no rank waits on a collective that another never starts."""
    mine = list(range(dp_rank, n_rows, dp_size))
    n_batches = math.ceil(math.ceil(n_rows / dp_size) / m)
    batches = [make(mine[j:j + m]) for j in range(0, len(mine), m)]
    while len(batches) < n_batches:
        batches.append(empty())
    return batches


class TrainLoader:
    """`next(loader)` -> this rank's micro-batches (list[PackedBatch]) for one optimizer step."""

    def __init__(self, spec: RunSpec, tokenizer, *, dp_rank: int = 0, dp_size: int = 1, rank: int = 0):
        # The spec is validated (config.validate): global_batch_size is a multiple of dp_size x micro_batch_size.
        train = spec.train
        per_step = dp_size * train.micro_batch_size
        self.data = PackedData(spec.data.datasets, spec, tokenizer, shuffle=True, verbose=rank == 0)
        self.seed = train.seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch_size = train.micro_batch_size
        self.grad_accum = train.global_batch_size // per_step
        self.global_batch_size = train.global_batch_size
        n = len(self.data.rows)
        if n == 0:
            raise DataError("no training sample left after tokenisation (all dropped or skipped)")
        self.steps_per_epoch = math.ceil(n / self.global_batch_size)
        if train.max_steps:
            self.total_steps = int(train.max_steps)
        else:
            self.total_steps = max(1, math.ceil((train.epochs or 1.0) * self.steps_per_epoch))
        self.step = 0
        self._perm: tuple[int, np.ndarray | None] = (-1, None)
        if rank == 0:
            s = self.stats
            log.info("data: %d samples -> %d rows of %d tokens, packing efficiency %.1f%%, %d steps/epoch",
                     s.samples, s.rows, self.data.row_len, 100 * s.packing_efficiency, self.steps_per_epoch)

    @property
    def stats(self) -> DataStats:
        return self.data.stats

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self):
        return self

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x70AD])
            self._perm = (epoch, rng.permutation(len(self.data.rows)))
        return self._perm[1]

    def step_rows(self, step: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches at `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._epoch_perm(epoch)
        n, g = len(perm), self.global_batch_size
        rows = [int(perm[(k * g + t) % n]) for t in range(g)]
        per_rank = self.grad_accum * self.micro_batch_size
        mine = rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[j:j + m] for j in range(0, per_rank, m)]

    def __next__(self) -> list[PackedBatch]:
        if self.step >= self.total_steps:
            raise StopIteration
        batches = [self.data.batch(r) for r in self.step_rows(self.step)]
        self.step += 1
        return batches

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def num_pairs(self) -> int:
        return self.data.num_pairs

    def reference_batches(self, dp_rank: int, dp_size: int) -> list[PackedBatch]:
        return self.data.all_batches(dp_rank, dp_size, self.micro_batch_size)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "rows": len(self.data.rows), "fingerprint": self.data.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.data.fingerprint() or state.get("seed") != self.seed:
            raise DataError(
                "the training data (or its packing, or train.seed) differs from the checkpoint's; "
                "resuming would not continue the same run"
            )
        self.step = int(state["step"])


def build_train_loader(spec: RunSpec, tokenizer, *, dp_rank: int = 0, dp_size: int = 1, rank: int = 0) -> TrainLoader:
    return TrainLoader(spec, tokenizer, dp_rank=dp_rank, dp_size=dp_size, rank=rank)


def build_eval_batches(spec: RunSpec, tokenizer, *, dp_rank: int = 0, dp_size: int = 1, rank: int = 0) -> list[PackedBatch]:
    """This rank's eval micro-batches; every rank gets the same number (padded with empty ones)."""
    if not spec.data.eval_datasets:
        return []
    data = PackedData(spec.data.eval_datasets, spec, tokenizer, shuffle=False, verbose=rank == 0)
    m = spec.train.micro_batch_size
    return _rank_batches(len(data.rows), dp_rank, dp_size, m, data.batch, lambda: data.empty_batch(m))
