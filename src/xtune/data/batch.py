"""Rows of packed pieces -> one PackedBatch (a micro-batch flattened to [1, T])."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from xtune.data.multimodal import load_tiles
from xtune.data.pack import Row
from xtune.data.types import IGNORE_INDEX, ImageRef, PackedBatch

# item -> (ids, labels, images) of the whole sample
ItemFn = Callable[[int], tuple[np.ndarray, np.ndarray, list[ImageRef]]]
TilesFn = Callable[[ImageRef], torch.Tensor]


def collate(rows: Sequence[Row], item: ItemFn, row_len: int, pad_id: int,
            tiles: TilesFn | None = None) -> PackedBatch:
    """Concatenate the pieces of `rows`, then pad to len(rows) * row_len with one pseudo-document.

    Every piece is its own document: positions restart at 0 and attention never crosses it. Its
    `doc_trained_tokens` is the trained-token count of the whole sample, not of the piece: a sample that
    hard packing cut across rows keeps its own weight under the sample/square loss reductions.
    """
    ids, labels, doc_lens, doc_trained, images = [], [], [], [], []
    for row in rows:
        for i, s, e in row:
            a, b, ims = item(i)
            b = np.asarray(b)
            ids.append(np.asarray(a[s:e]))
            labels.append(b[s:e])
            doc_lens.append(e - s)
            doc_trained.append(int((b != IGNORE_INDEX).sum()))
            images += [im for im in ims if s <= im.token_start and im.token_start + im.num_tokens <= e]
    total = max(1, len(rows)) * row_len
    pad = total - sum(doc_lens)
    if pad < 0:
        raise ValueError(f"rows hold {sum(doc_lens)} tokens, more than {total}")
    if pad:
        ids.append(np.full(pad, pad_id))
        labels.append(np.full(pad, IGNORE_INDEX))
        doc_lens.append(pad)
        doc_trained.append(0)
    input_ids = torch.from_numpy(np.concatenate(ids).astype(np.int64))
    label_t = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    lens = torch.tensor(doc_lens, dtype=torch.int64)
    cu = torch.zeros(len(doc_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    # position = index - start of its document
    starts = torch.repeat_interleave(cu[:-1].long(), lens)
    position_ids = torch.arange(total, dtype=torch.int64) - starts
    pixel_values = None
    if images and tiles is not None:
        pixel_values = torch.cat([tiles(im) for im in images])
    return PackedBatch(
        input_ids=input_ids.unsqueeze(0),
        labels=label_t.unsqueeze(0),
        position_ids=position_ids.unsqueeze(0),
        cu_seqlens=cu,
        max_seqlen=int(lens.max()),
        pixel_values=pixel_values,
        doc_trained_tokens=torch.tensor(doc_trained, dtype=torch.int64),
    )


def image_tiles_fn(model_spec) -> TilesFn:
    return lambda im: load_tiles(
        im.path, model_spec.image_size, model_spec.max_tiles, model_spec.use_thumbnail, (im.width, im.height)
    )
