"""Mixing by ratio, packing strategies, and the PackedBatch layout."""

import numpy as np
import pytest
import torch

from xtune.data.batch import collate
from xtune.data.mix import mix, ratio_indices
from xtune.data.pack import efficiency, pack
from xtune.data.types import IGNORE_INDEX, ImageRef


def test_ratio_integer_repeats_fraction_subsets():
    idx = ratio_indices(10, 2.5, seed=1, salt=0)
    counts = np.bincount(idx, minlength=10)
    assert len(idx) == 25 and set(counts) == {2, 3} and (counts == 3).sum() == 5
    assert np.array_equal(idx, ratio_indices(10, 2.5, seed=1, salt=0))  # seeded
    assert not np.array_equal(idx, ratio_indices(10, 2.5, seed=2, salt=0))
    assert len(ratio_indices(10, 0.0, 1, 0)) == 0
    m = mix([3, 4], [1.0, 0.5], seed=0)
    assert m[:3].tolist() == [[0, 0], [0, 1], [0, 2]] and (m[3:, 0] == 1).all() and len(m) == 5


def check_cover(rows, lengths, cap):
    """Every token of every sample is in exactly one piece, rows are within cap."""
    seen = {i: [] for i in range(len(lengths))}
    for row in rows:
        assert sum(e - s for _, s, e in row) <= cap
        for i, s, e in row:
            seen[i].append((s, e))
    for i, n in enumerate(lengths):
        spans = sorted(seen[i])
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("strategy", ["soft", "bfd", "hard", "none"])
def test_strategies_cover_every_token(strategy):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, 300).tolist()
    rows = pack(strategy, lengths, 128, lookahead=16)
    check_cover(rows, lengths, 128)
    eff = efficiency(rows, 128)
    assert 0 < eff <= 1
    if strategy == "none":
        assert len(rows) == 300
    if strategy == "hard":
        assert all(sum(e - s for _, s, e in r) == 128 for r in rows[:-1])  # no gap without images
    if strategy in ("soft", "bfd"):
        assert eff > 0.9
        assert all(s == 0 and e == lengths[i] for r in rows for i, s, e in r)  # whole samples


def test_soft_keeps_order_and_fills_gaps_from_the_window():
    lengths = [60, 50, 30, 5, 8, 40]
    rows = pack("soft", lengths, 100, lookahead=4)
    # 60, then 50 does not fit: the gap of 40 is filled from the window (items 1..3): 30, then 5
    assert [[i for i, _, _ in r] for r in rows] == [[0, 2, 3], [1, 4, 5]]
    rows0 = pack("soft", lengths, 100, lookahead=1)  # no look-ahead: plain greedy in order
    assert [[i for i, _, _ in r] for r in rows0] == [[0], [1, 2, 3, 4], [5]]


def test_bfd_beats_naive_order():
    # In order, best fit needs 3 rows ([40, 40], [60], [60]); longest first pairs each 60 with a 40: 2 rows.
    lengths = [40, 40, 60, 60]
    rows = pack("bfd", lengths, 100)
    check_cover(rows, lengths, 100)
    assert sorted(sorted(lengths[i] for i, _, _ in r) for r in rows) == [[40, 60], [40, 60]]
    assert len(pack("soft", lengths, 100, lookahead=1)) == 3


def check_blocks_whole(rows, blocks):
    """Each image block lies inside one piece: no piece boundary falls strictly inside a block."""
    for row in rows:
        for i, s, e in row:
            for a, b in blocks.get(i, ()):
                assert not (a < s < b) and not (a < e < b), (i, s, e, a, b)


@pytest.mark.parametrize("lengths,blocks,expected", [
    # a plain cut at 64 would fall at token 14 of item 1, inside its block [10, 30)
    ([50, 80], {1: [(10, 30)]}, [[(0, 0, 50), (1, 0, 10)], [(1, 10, 74)], [(1, 74, 80)]]),
    # the first cut (token 14 of item 1) passes its block [5, 12); the second plain cut, at token 78,
    # would fall inside its block [70, 90)
    ([50, 100], {1: [(5, 12), (70, 90)]}, [[(0, 0, 50), (1, 0, 14)], [(1, 14, 70)], [(1, 70, 100)]]),
])
def test_hard_never_splits_image_blocks(lengths, blocks, expected):
    naive = pack("hard", lengths, 64)
    with pytest.raises(AssertionError):  # the lengths are such that a plain cut splits a block
        check_blocks_whole(naive, blocks)
    rows = pack("hard", lengths, 64, image_blocks=blocks)
    check_cover(rows, lengths, 64)
    check_blocks_whole(rows, blocks)
    assert rows == expected  # the cut moves to just before the block; the row ends early


def test_sample_longer_than_row_rejected():
    with pytest.raises(ValueError):
        pack("soft", [10, 200], 100)


def make_items():
    ids = [np.arange(100, 105), np.arange(200, 203), np.arange(300, 310)]
    labels = [np.concatenate([x[1:], [IGNORE_INDEX]]) for x in ids]
    labels[1][:] = IGNORE_INDEX
    return lambda i: (ids[i], labels[i], [])


def test_collate_layout_and_padding():
    item = make_items()
    b = collate([[(0, 0, 5), (1, 0, 3)], [(2, 0, 10)]], item, row_len=12, pad_id=0)
    assert b.input_ids.shape == (1, 24)
    assert b.cu_seqlens.tolist() == [0, 5, 8, 18, 24] and b.cu_seqlens.dtype == torch.int32
    assert b.position_ids[0].tolist() == list(range(5)) + list(range(3)) + list(range(10)) + list(range(6))
    assert b.max_seqlen == 10
    assert b.doc_trained_tokens.tolist() == [4, 0, 9, 0]
    assert (b.labels[0, 18:] == IGNORE_INDEX).all() and (b.input_ids[0, 18:] == 0).all()
    # the shift never crosses a document: each document's last label is ignored
    for end in b.cu_seqlens[1:].tolist():
        assert b.labels[0, end - 1] == IGNORE_INDEX
    assert b.num_trained == 13 and b.pixel_values is None


def test_collate_split_piece_keeps_labels_and_images():
    ids = np.arange(10)
    labels = np.concatenate([ids[1:], [IGNORE_INDEX]])
    im = ImageRef("x.png", 8, 8, 1, token_start=6, num_tokens=3)
    item = lambda i: (ids, labels, [im])  # noqa: E731
    loaded = []
    tiles = lambda ref: loaded.append(ref) or torch.zeros(ref.num_tiles, 3, 2, 2)  # noqa: E731
    first = collate([[(0, 0, 5)]], item, 5, 0, tiles)
    assert first.labels[0].tolist() == [1, 2, 3, 4, 5] and first.pixel_values is None
    second = collate([[(0, 5, 10)]], item, 5, 0, tiles)
    assert second.position_ids[0].tolist() == [0, 1, 2, 3, 4]
    assert second.pixel_values.shape == (1, 3, 2, 2) and loaded == [im]
