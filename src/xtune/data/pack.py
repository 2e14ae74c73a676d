"""Packing samples into rows of at most `cap` tokens.

A row is a list of pieces `(item, start, end)`: tokens `start:end` of item `item` (an index
into the list of lengths given). Every strategy but `hard` uses whole samples (`start == 0`,
`end == length`).

- soft: in order; when the next sample does not fit, the row's gap is filled from the next
  `lookahead` samples, repeatedly taking the largest one that still fits (best fit). Filling with
  the shortest ones first packs worse (bench/README.md), since it spends the short samples that later
  gaps need. The sample order is otherwise kept.
- bfd: best-fit decreasing (longest first, each into the fullest row it fits in).
- hard: the samples concatenated and cut every `cap` tokens. A cut piece keeps its labels (the
  target of its last token is that token's real successor, which a causal model may predict).
  A cut never falls inside an image block (`<img>` .. `</img>`): the cut moves to just before
  the block, the row ends early (padded) and the block starts the next row.
- none: one sample per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

Piece = tuple[int, int, int]
Row = list[Piece]


def pack(strategy: str, lengths: Sequence[int], cap: int, lookahead: int = 256,
         image_blocks: dict[int, list[tuple[int, int]]] | None = None) -> list[Row]:
    lengths = [int(x) for x in lengths]
    if strategy != "hard":
        too_long = [i for i, n in enumerate(lengths) if n > cap]
        if too_long:
            raise ValueError(f"{len(too_long)} sample(s) longer than the row length {cap}")
    if strategy == "soft":
        return pack_soft(lengths, cap, lookahead)
    if strategy == "bfd":
        return pack_bfd(lengths, cap)
    if strategy == "hard":
        return pack_hard(lengths, cap, image_blocks or {})
    if strategy == "none":
        return [[(i, 0, n)] for i, n in enumerate(lengths)]
    raise ValueError(f"unknown packing strategy {strategy!r}")


def pack_soft(lengths: list[int], cap: int, lookahead: int) -> list[Row]:
    n = len(lengths)
    used = [False] * n
    window: list[tuple[int, int]] = []  # (length, item) of unused items ahead, sorted
    entered = 0  # items [0, entered) have been put in the window
    rows: list[Row] = []
    head = 0
    while True:
        while head < n and used[head]:
            head += 1
        if head >= n:
            return rows
        while entered < n and entered < head + max(1, lookahead):
            bisect.insort(window, (lengths[entered], entered))
            entered += 1

        def take(i: int) -> None:
            used[i] = True
            window.pop(bisect.bisect_left(window, (lengths[i], i)))
            row.append((i, 0, lengths[i]))  # noqa: B023 (row of this iteration)

        row: Row = []
        take(head)
        space = cap - lengths[head]
        nxt = head + 1
        while True:  # keep the order while the next samples fit
            while nxt < entered and used[nxt]:
                nxt += 1
            if nxt == entered < n:  # the next in order may lie beyond the window
                bisect.insort(window, (lengths[entered], entered))
                entered += 1
            if nxt < entered and lengths[nxt] <= space:
                take(nxt)
                space -= lengths[nxt]
            else:
                break
        while True:  # then fill the gap from the window, largest fitting sample first
            k = bisect.bisect_right(window, (space, n)) - 1
            if k < 0:
                break
            length, i = window[k]
            take(i)
            space -= length
        rows.append(row)


def pack_bfd(lengths: list[int], cap: int) -> list[Row]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted: best fit = first with space >= length
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = cap, len(rows)
            rows.append([])
        rows[r].append((i, 0, n))
        bisect.insort(free, (space - n, r))
    return rows


def pack_hard(lengths: list[int], cap: int, image_blocks: dict[int, list[tuple[int, int]]]) -> list[Row]:
    rows: list[Row] = []
    row: Row = []
    used = 0
    for i, n in enumerate(lengths):
        s = 0
        while s < n:
            cut = min(n, s + cap - used)
            for a, b in image_blocks.get(i, ()):
                if a < cut < b:  # the cut would split this image block
                    cut = a
                    break
            if cut > s:
                row.append((i, s, cut))
                used += cut - s
                s = cut
            if used == cap or s < n:  # full, or the rest must start a new row
                if not row:
                    raise ValueError(f"an image block of item {i} is longer than the row length {cap}")
                rows.append(row)
                row, used = [], 0
    if row:
        rows.append(row)
    return rows


def efficiency(rows: list[Row], cap: int) -> float:
    """Real tokens / row tokens (rows are padded to `cap`)."""
    if not rows:
        return 0.0
    real = sum(e - s for row in rows for _, s, e in row)
    return real / (len(rows) * cap)


def rows_fingerprint(rows: list[Row]) -> np.ndarray:
    flat = np.array([p for row in rows for p in row] or [(0, 0, 0)], dtype=np.int64)
    sizes = np.array([len(r) for r in rows], dtype=np.int64)
    return np.concatenate([flat.ravel(), sizes])
