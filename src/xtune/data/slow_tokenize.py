"""Token ids and trained-token masks with Python ("slow") tokenizers, which give no character offsets.

Intern-S1's tokenizer is such a class (byte-level BPE plus sentencepiece sub-tokenizers for SMILES,
IUPAC and FASTA spans); converting it to a fast tokenizer would drop the sub-tokenizers, so xtune
tokenises with the class itself.

The ids are `tokenizer.encode(text, add_special_tokens=False)` of the whole rendered text: exactly
what `apply_chat_template(..., tokenize=True)` returns. Which tokens are trained follows the fast
path's rule (a token is trained when its first character lies in a trained span), found without
offsets: the text is cut at every span boundary and each piece is encoded alone. When the pieces'
ids concatenate to the whole text's ids (the usual case: boundaries fall next to added tokens such
as `<|im_end|>` or at pre-token boundaries), every token belongs to one piece. Otherwise a token
straddles a boundary, and the token starts are found by decoding prefixes of the ids (a binary
search per boundary).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from xtune.errors import DataError


def is_slow(tokenizer) -> bool:
    """True for tokenizers without a `tokenizers` backend (Python classes such as Intern-S1's)."""
    return getattr(tokenizer, "backend_tokenizer", None) is None


def token_id(tokenizer, token: str):
    """The id of `token`, or None when the vocabulary lacks it (slow tokenizers map unknowns to unk)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def encode_trained(tokenizer, text: str, spans: Sequence[tuple[int, int]], source: str = "") -> tuple[list[int], np.ndarray]:
    """(ids of `text`, bool mask of the tokens whose first character lies in one of `spans`)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    trained = np.zeros(len(ids), dtype=bool)
    if not spans or not ids:
        return ids, trained
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    pieces = [tokenizer.encode(text[a:b], add_special_tokens=False) for a, b in zip(cuts, cuts[1:])]
    if sum(len(p) for p in pieces) == len(ids) and [t for p in pieces for t in p] == ids:
        starts = np.repeat(np.array(cuts[:-1]), [len(p) for p in pieces])
    else:
        starts = _starts_by_decoding(tokenizer, ids, text, cuts, source)
    for a, b in spans:
        trained |= (starts >= a) & (starts < b)
    return ids, trained


def _starts_by_decoding(tokenizer, ids: list[int], text: str, cuts: list[int], source: str) -> np.ndarray:
    """A start position per token, exact at the cuts: for each cut c, the tokens decoding (as a prefix of
    the ids) to fewer than c characters start before it. Needs a tokenizer whose decoding gives the text back."""

    def decoded_len(k: int) -> int:
        return len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    if decoded_len(len(ids)) != len(text):
        raise DataError(f"{source}: the tokenizer does not decode this text back to itself; cannot place the labels")
    # first[j]: the first token index whose prefix already covers cuts[j] characters (binary search)
    first = []
    for c in cuts:
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if decoded_len(mid) >= c:
                hi = mid
            else:
                lo = mid + 1
        first.append(lo)
    # token k starts in the cut interval j with first[j] <= k < first[j + 1], taken as starting at cuts[j]
    return np.array([cuts[max(0, bisect_right(first, k) - 1)] for k in range(len(ids))])
