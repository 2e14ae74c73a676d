"""Plain objects that flow from the data stage to the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class ImageRef:
    """One image of a sample: where it is and how many tiles/tokens it becomes."""

    path: str
    width: int
    height: int
    num_tiles: int  # including the thumbnail when used
    # Position of the image's `<img>` token in its sample, and its token count (`<img>` + context
    # tokens + `</img>`); packing uses them to keep an image's tokens in one piece.
    token_start: int = -1
    num_tokens: int = 0


@dataclass
class Sample:
    """One tokenised document.

    `labels[i]` is the target for position i, already shifted inside the document:
    labels[i] = input_ids[i + 1] where that next token is trained, else IGNORE_INDEX, and
    the last position is always IGNORE_INDEX. Packing can therefore concatenate samples
    without any shift ever crossing a document boundary.
    """

    input_ids: list[int]
    labels: list[int]
    images: list[ImageRef] = field(default_factory=list)
    source: str = ""  # "file:line" for error messages and inspection

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class PackedBatch:
    """One micro-batch: one or more packed rows flattened into a single [1, T] sequence.

    Documents are delimited by `cu_seqlens` (int32, [num_docs + 1], starting at 0 and ending
    at T) and `position_ids` restart at 0 for each document. Padding, when present, is one
    trailing pseudo-document whose labels are all IGNORE_INDEX.
    """

    input_ids: torch.Tensor  # [1, T] long
    labels: torch.Tensor  # [1, T] long, shifted as in Sample
    position_ids: torch.Tensor  # [1, T] long
    cu_seqlens: torch.Tensor  # [num_docs + 1] int32
    max_seqlen: int
    pixel_values: torch.Tensor | None = None  # [num_tiles, 3, H, W] float
    # Per document: its number of trained tokens (for sample / square reductions).
    doc_trained_tokens: torch.Tensor | None = None  # [num_docs] long
    # Preference pairs: document indices (chosen, rejected) of each pair, and its id in the data set
    # (the key of its reference log-probs).
    pair_docs: torch.Tensor | None = None  # [num_pairs, 2] long
    pair_ids: torch.Tensor | None = None  # [num_pairs] long

    @property
    def num_pairs(self) -> int:
        return 0 if self.pair_docs is None else int(self.pair_docs.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> PackedBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            pixel_values=move(self.pixel_values),
            doc_trained_tokens=move(self.doc_trained_tokens),
            pair_docs=move(self.pair_docs),
            pair_ids=move(self.pair_ids),
        )
