"""Records -> token ids and shifted labels, rendered with the chat template.

Each conversation is rendered once with the template and tokenised once, so the ids are
exactly `tokenizer.apply_chat_template(messages, tokenize=True)`. Which tokens are trained is
decided on the rendered text: a trained message spans from where its content starts to the
end of its end-of-turn token, and a token is trained when its first character lies in such a
span. Assistant turns start after the template's generation header; because the span covers
everything the template renders for the assistant, the (empty) `<think>\\n\\n</think>\\n\\n`
block Qwen3 puts in the last assistant turn is trained: it is what the model must generate
after `<|im_start|>assistant\\n` to answer without reasoning.

With `data.strip_empty_think` that empty block is left untrained (as XTuner's labels do): the
ids stay those of the template, the answer's tokens after it are trained. A non-empty think
block (reasoning) is trained either way.

Python ("slow") tokenizers, such as Intern-S1's remote-code class, take the same path with
their own encoder (see `slow_tokenize`); tokenizers-backed ones are encoded in batches with offsets.

`pretrain` records bypass the template: their text plus the tokenizer's eos token, all trained.
Images: each `<IMG_CONTEXT>` placeholder token becomes `<img>` + n x `<IMG_CONTEXT>` + `</img>`
(never trained); ids around the placeholder are unaffected because these are added tokens.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

from xtune.data import multimodal
from xtune.data.preference import labels_of, truncate_pair
from xtune.data.records import Record
from xtune.data.slow_tokenize import encode_trained, is_slow, token_id
from xtune.data.templates import Renderer
from xtune.data.types import IGNORE_INDEX, ImageRef
from xtune.errors import DataError


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides the tokenizer that decides the tokens (part of the cache key)."""

    template: str
    sample_max_length: int
    image_size: int = 448
    tokens_per_tile: int = 256
    max_tiles: int = 12
    use_thumbnail: bool = True
    strip_empty_think: bool = False
    # Preference pairs (chosen, rejected) instead of conversations; pairs are limited to this many tokens.
    preference: bool = False
    pair_max_length: int = 0


# The empty reasoning block Qwen3-style templates put before an answer without reasoning.
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


@dataclass
class TokenizedChunk:
    """Tokenised samples of a run of records, stored flat (cheap to pickle, save and concatenate)."""

    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    images: list[list[ImageRef]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    records: int = 0
    truncated: int = 0
    dropped_image_cut: int = 0
    dropped_no_loss: int = 0
    errors: list[str] = field(default_factory=list)  # skipped records (on_error=skip)

    # Sent from worker processes as two flat arrays and the lengths: pickling thousands of small
    # arrays one by one costs more than tokenising them. Unpickled samples are views of the flat arrays.
    def __getstate__(self):
        state = dict(self.__dict__)
        lengths = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32)  # noqa: E731
        state["ids"], state["labels"] = (cat(self.ids), lengths), cat(self.labels)
        return state

    def __setstate__(self, state):
        flat_ids, lengths = state["ids"]
        cuts = np.cumsum(lengths)[:-1]
        state["ids"] = np.split(flat_ids, cuts) if len(lengths) else []
        state["labels"] = np.split(state["labels"], cuts) if len(lengths) else []
        self.__dict__.update(state)


class SampleTokenizer:
    def __init__(self, tokenizer, settings: TokenizeSettings):
        self.tok = tokenizer
        self.backend = None if is_slow(tokenizer) else tokenizer.backend_tokenizer
        self.s = settings
        self.renderer = Renderer(tokenizer, settings.template)
        # The three ids only (`get_vocab()` would build a dict of the whole vocabulary): None when absent.
        img_tokens = (multimodal.IMG_START, multimodal.IMG_CONTEXT, multimodal.IMG_END)
        if self.backend is None:
            self.img_ids = tuple(token_id(tokenizer, t) for t in img_tokens)
        else:
            self.img_ids = tuple(self.backend.token_to_id(t) for t in img_tokens)
        self.eos_id = tokenizer.eos_token_id

    # -- text ---------------------------------------------------------------------------------
    def text_and_spans(self, rec: Record) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans that are trained."""
        msgs = rec.messages
        if rec.is_pretrain:
            text, spans, pos = "", [], 0
            for m, flag in zip(msgs, rec.loss):
                c = m["content"]
                if flag is not False:
                    spans.append((pos, pos + len(c)))
                text += c
                pos += len(c)
            return text, spans
        try:  # the markers are probed on first use: a template failing there fails for this record too
            text = self.renderer.render(msgs, tools=rec.meta.get("tools"))
            header, eot = self.renderer.header, self.renderer.eot
        except DataError as e:
            raise DataError(f"{rec.source}: {e}") from None
        spans, cursor = [], 0
        for i, (m, flag) in enumerate(zip(msgs, rec.loss)):
            content = m["content"]
            train = flag if flag is not None else m["role"] == "assistant"
            if m["role"] == "assistant":
                h = text.find(header, cursor)
                if h < 0:
                    raise DataError(f"{rec.source}: message {i}: the template rendered no assistant turn for it")
                start = h + len(header)
                end = text.find(eot, start)
                end = len(text) if end < 0 else end + len(eot)
                if self.s.strip_empty_think:
                    think = EMPTY_THINK.match(text, start, end)
                    start = think.end() if think else start
            else:
                start = text.find(content, cursor) if content else -1
                if start < 0:
                    if train:
                        raise DataError(f"{rec.source}: message {i}: its content is not in the rendered template")
                    continue
                end = start + len(content)
                if text.startswith(eot, end):
                    end += len(eot)
            if train:
                spans.append((start, end))
            cursor = end
        return text, spans

    # -- tokens -------------------------------------------------------------------------------
    def encode(self, records: list[Record]) -> list[tuple[list[int], np.ndarray, list]]:
        """(ids, trained mask, trained character spans) of each record, rendered with the template."""
        texts, spans = [], []
        for rec in records:
            t, sp = self.text_and_spans(rec)
            texts.append(t)
            spans.append(sp)
        if self.backend is None:
            out = []
            for rec, text, sp in zip(records, texts, spans):
                ids, trained = encode_trained(self.tok, text, sp, rec.source)
                out.append((ids, trained, sp))
            return out
        out = []
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        for enc, sp in zip(encodings, spans):
            trained = np.zeros(len(enc.ids), dtype=bool)
            if sp:
                # token k is trained when its first character lies in a span; offsets are non-decreasing
                starts = [o[0] for o in enc.offsets]
                for a, b in sp:
                    trained[bisect_left(starts, a):bisect_left(starts, b)] = True
            out.append((enc.ids, trained, sp))
        return out

    def tokenize(self, records: list[Record], out: TokenizedChunk) -> None:
        for rec, (ids, trained, sp) in zip(records, self.encode(records)):
            self._finish(rec, ids, trained, sp, out)

    def tokenize_pairs(self, pairs: list[tuple[Record, Record]], out: TokenizedChunk) -> None:
        """Each (chosen, rejected) pair -> two consecutive samples, truncated together (see `preference`)."""
        flat = [r for pair in pairs for r in pair]
        encoded = self.encode(flat)
        for k, (chosen, rejected) in enumerate(pairs):
            out.records += 1
            halves, images = [], []
            for rec, (ids, trained, _) in zip((chosen, rejected), encoded[2 * k:2 * k + 2]):
                ids, trained, ims = self._expand_images(rec, np.array(ids, dtype=np.int64), trained)
                halves.append((ids, trained))
                images.append(ims)
            halves, cut = truncate_pair(halves, self.s.sample_max_length, self.s.pair_max_length)
            if cut and any(images):  # image tokens must stay whole: such a pair is dropped, not cut
                out.dropped_image_cut += 1
                continue
            out.truncated += int(cut)
            if not all(tr[1:].any() for _, tr in halves):
                out.dropped_no_loss += 1
                continue
            for rec, (ids, trained), ims in zip((chosen, rejected), halves, images):
                out.ids.append(ids.astype(np.int32))
                out.labels.append(labels_of(ids, trained))
                out.images.append(ims)
                out.sources.append(rec.source)

    def _finish(self, rec: Record, ids: list[int], trained: np.ndarray, spans, out: TokenizedChunk) -> None:
        out.records += 1
        ids = np.array(ids, dtype=np.int64)
        if rec.is_pretrain and self.eos_id is not None:
            ids = np.append(ids, self.eos_id)
            trained = np.append(trained, bool(spans) and rec.loss[-1] is not False)
        ids, trained, images = self._expand_images(rec, ids, trained)

        limit = self.s.sample_max_length
        if len(ids) > limit:
            if any(im.token_start + im.num_tokens > limit for im in images):
                out.dropped_image_cut += 1
                return
            ids, trained = ids[:limit], trained[:limit]
            out.truncated += 1
        if not trained[1:].any():  # the labels would all be IGNORE_INDEX
            out.dropped_no_loss += 1
            return
        ids = ids.astype(np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
        out.ids.append(ids)
        out.labels.append(labels)
        out.images.append(images)
        out.sources.append(rec.source)

    def _expand_images(self, rec: Record, ids: np.ndarray, trained: np.ndarray):
        start_id, ctx_id, end_id = self.img_ids
        if not rec.images:
            if ctx_id is not None and (ids == ctx_id).any():
                raise DataError(f"{rec.source}: {multimodal.IMG_CONTEXT} in the text but the record has no image")
            return ids, trained, []
        if None in self.img_ids:
            raise DataError(
                f"{rec.source}: the record has images but the tokenizer has no "
                f"{multimodal.IMG_START} / {multimodal.IMG_CONTEXT} / {multimodal.IMG_END} tokens"
            )
        where = np.flatnonzero(ids == ctx_id)
        if len(where) != len(rec.images):
            raise DataError(
                f"{rec.source}: {len(where)} {multimodal.IMG_CONTEXT} placeholder(s) rendered for {len(rec.images)} image(s)"
            )
        s = self.s
        pieces_ids, pieces_tr, images, prev, pos = [], [], [], 0, 0
        for k, img in zip(where, rec.images):
            try:  # a header read per image, so a bad one stops the run now, not when its batch comes
                size = multimodal.probe_image(img.path)
            except ValueError as e:
                raise DataError(f"{rec.source}: {e}") from None
            w, h = img.wh or size
            tiles = multimodal.num_tiles(w, h, s.image_size, s.max_tiles, s.use_thumbnail)
            block = np.concatenate([[start_id], np.full(tiles * s.tokens_per_tile, ctx_id), [end_id]])
            pieces_ids += [ids[prev:k], block]
            pieces_tr += [trained[prev:k], np.zeros(len(block), dtype=bool)]
            pos += k - prev
            images.append(ImageRef(img.path, int(w), int(h), int(tiles), token_start=int(pos), num_tokens=len(block)))
            pos += len(block)
            prev = k + 1
        pieces_ids.append(ids[prev:])
        pieces_tr.append(trained[prev:])
        return np.concatenate(pieces_ids).astype(np.int64), np.concatenate(pieces_tr), images


# The last SampleTokenizer built in this process (its template is compiled and probed once, not per chunk).
_CACHED: list[SampleTokenizer] = []


def sample_tokenizer(tokenizer, settings: TokenizeSettings) -> SampleTokenizer:
    """A SampleTokenizer for (tokenizer, settings), reused across the chunks a process tokenises."""
    if _CACHED and _CACHED[0].tok is tokenizer and _CACHED[0].s == settings:
        return _CACHED[0]
    st = SampleTokenizer(tokenizer, settings)
    _CACHED[:] = [st]
    return st
