"""One tokenised dataset: read from the cache, or tokenised (once, by one process) and cached."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import numpy as np

from xtune.data import cache
from xtune.data.convert import Converter, resolve_format
from xtune.data.records import count_kinds
from xtune.data.sources import iter_file, list_files
from xtune.data.templates import resolve_template
from xtune.data.tokenize import TokenizeSettings
from xtune.data.tokenize_files import tokenize_files
from xtune.data.types import IGNORE_INDEX, ImageRef, Sample
from xtune.errors import DataError

log = logging.getLogger("xtune.data")
MAX_ERRORS_SHOWN = 5


@dataclass
class TokenizedDataset:
    name: str
    files: list[str]
    ids: np.ndarray  # flat int32
    labels: np.ndarray  # flat int32, shifted per sample
    offsets: np.ndarray  # [n + 1] int64
    images: list[list[ImageRef]]
    sources: list[str]
    records: int
    truncated: int
    dropped_image_cut: int
    dropped_no_loss: int
    errors: list[str]
    built: bool  # tokenised by this process (False: read from the cache)
    format: str = "messages"  # the record format read (auto resolved)
    group: int = 1  # samples per item: 2 for preference pairs (chosen, rejected), else 1

    @property
    def num_items(self) -> int:
        """What the mix draws from: samples, or pairs of samples."""
        return len(self) // self.group

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> Sample:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Sample(self.ids[a:b].tolist(), self.labels[a:b].tolist(), list(self.images[i]), self.sources[i])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trained(self) -> int:
        return int((np.asarray(self.labels) != IGNORE_INDEX).sum())

    def report(self) -> None:
        """One warning line per kind of loss."""
        if self.truncated:
            what = "pair(s) longer than sample_max_length / pack_max_length" if self.group == 2 else \
                "sample(s) longer than sample_max_length"
            log.warning("%s: %d %s were truncated", self.name, self.truncated, what)
        if self.dropped_image_cut:
            log.warning("%s: %d multimodal sample(s) dropped: truncation would cut image tokens",
                        self.name, self.dropped_image_cut)
        if self.dropped_no_loss:
            log.warning("%s: %d sample(s) dropped: no trained token", self.name, self.dropped_no_loss)
        if self.errors:
            shown = "; ".join(self.errors[:MAX_ERRORS_SHOWN])
            kinds = ", ".join(f"{n} {kind}" for kind, n in count_kinds(self.errors).items())
            log.warning("%s: %d bad record(s) skipped (data.on_error=skip): %s; first: %s",
                        self.name, len(self.errors), kinds, shown)


def tokenize_settings(tokenizer, data_spec, model_spec, preference: bool = False) -> TokenizeSettings:
    return TokenizeSettings(
        template=resolve_template(tokenizer, data_spec.template, model_spec.family),
        sample_max_length=data_spec.sample_max_length,
        image_size=model_spec.image_size,
        tokens_per_tile=model_spec.tokens_per_tile,
        max_tiles=model_spec.max_tiles,
        use_thumbnail=model_spec.use_thumbnail,
        strip_empty_think=data_spec.strip_empty_think,
        preference=preference,
        pair_max_length=data_spec.pack_max_length if preference else 0,
    )


def load_dataset(ds_spec, tokenizer, data_spec, model_spec, *, tokenizer_digest: str | None = None,
                 verbose: bool = True, preference: bool = False) -> TokenizedDataset:
    """Tokenise `ds_spec` (a DatasetSpec) or read it from the cache. `preference`: the records are
    preference pairs, stored as two consecutive samples each (chosen, rejected)."""
    files = list_files(ds_spec.path)
    columns = dict(ds_spec.columns or {})
    # Preference pairs have their own record forms (xtune.data.preference); format/columns apply to SFT data.
    fmt = "messages" if preference else resolve_format(ds_spec.format, columns, files[0], next(iter_file(files[0])))
    if verbose and not preference:
        log.info("%s: format %s%s", ds_spec.name, fmt, " (auto-detected)" if ds_spec.format == "auto" else "")
    converter = Converter(fmt, columns)
    settings = tokenize_settings(tokenizer, data_spec, model_spec, preference)
    digest = tokenizer_digest or cache.tokenizer_hash(tokenizer)
    root = cache.default_cache_dir(data_spec.cache_dir)
    key = cache.cache_key(files, digest, settings, f"{ds_spec.media_root}|{fmt}|{sorted(columns.items())}",
                          data_spec.on_error, memo_dir=root / "files")
    folder = root / key

    def build():
        if verbose:
            log.info("tokenising %s (%d file(s), %d worker(s))", ds_spec.name, len(files), data_spec.num_workers)
        chunk = tokenize_files(
            tokenizer, settings, files, ds_spec.media_root,
            num_workers=data_spec.num_workers, skip_errors=data_spec.on_error == "skip",
            convert=None if converter.is_identity else converter,
        )
        cache.save_entry(folder, chunk, {"name": ds_spec.name, "files": files})

    try:
        built = cache.build_or_load(folder, build)
    except OSError as e:  # the cache folder: no permission, read-only, or the disk filled up while writing
        full = "; the disk is full: free space or put the cache elsewhere" if e.errno == errno.ENOSPC else ""
        what = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        raise DataError(f"data.cache_dir: cannot write the tokenised data to {folder.parent} "
                        f"({what}){full} (data.cache_dir or XTUNE_CACHE)") from None
    e = cache.load_entry(folder)
    ds = TokenizedDataset(
        name=ds_spec.name, files=files, ids=e["ids"], labels=e["labels"], offsets=e["offsets"],
        images=e["images"], sources=e["sources"], records=e["records"], truncated=e["truncated"],
        dropped_image_cut=e["dropped_image_cut"], dropped_no_loss=e["dropped_no_loss"], errors=e["errors"],
        built=built, group=2 if preference else 1, format=fmt,
    )
    if verbose:
        ds.report()
    return ds
