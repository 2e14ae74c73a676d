"""Tokenising files: the records of each file parsed (or converted) line by line and tokenised in batches by a
`SampleTokenizer`, in worker processes when `data.num_workers` > 1 (the tokenizer is sent once per worker), with
bad records skipped and counted when `on_error=skip`."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

from xtune.data.preference import pair_records, parse_pair
from xtune.data.records import parse_record
from xtune.data.slow_tokenize import is_slow
from xtune.data.sources import iter_file
from xtune.data.tokenize import TokenizedChunk, TokenizeSettings, sample_tokenizer
from xtune.errors import DataError


def tokenize_lines(
    tokenizer, settings: TokenizeSettings, file: str, lines: list[tuple[int, str]], media_root: str,
    skip_errors: bool, batch: int = 64, convert=None,
) -> TokenizedChunk:
    """Parse and tokenise (line number, text) pairs of one file; `convert(where, text)` maps another record
    format to messages first (`data.convert.Converter`)."""
    st = sample_tokenizer(tokenizer, settings)
    out = TokenizedChunk()
    pending: list = []
    run = st.tokenize_pairs if settings.preference else st.tokenize

    def parse(lineno, line):
        if settings.preference:
            return pair_records(parse_pair(file, lineno, line), file, lineno, media_root)
        if convert is not None:
            line = convert(f"{file}:{lineno}", line)
        return parse_record(file, lineno, line, media_root)

    def flush():
        if not pending:
            return
        try:
            run(pending, out)
        except DataError:
            if not skip_errors:
                raise
            for rec in pending:  # find the bad record(s) one by one
                try:
                    run([rec], out)
                except DataError as e:
                    out.errors.append(str(e))
        pending.clear()

    for lineno, line in lines:
        try:
            pending.append(parse(lineno, line))
        except DataError as e:
            if not skip_errors:
                raise
            out.errors.append(str(e))
        if len(pending) >= batch:
            flush()
    flush()
    return out


SLOW_CHUNK_LINES = 64

# Worker-process state: the tokenizer is sent once per worker, not once per chunk.
_WORKER: dict[str, object] = {}


def _worker_init(tokenizer, settings: TokenizeSettings) -> None:
    # Workers are the parallelism: each encodes on its own thread. Set even when the user set it to true: a
    # child forked after the parent's thread pool ran would wait for the pool's threads, which fork did not copy.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = tokenizer
    _WORKER["settings"] = settings


def _worker_run(file: str, lines, media_root: str, skip_errors: bool, convert=None) -> TokenizedChunk:
    return tokenize_lines(_WORKER["tokenizer"], _WORKER["settings"], file, lines, media_root, skip_errors,
                          convert=convert)


def merge_chunks(chunks: list[TokenizedChunk]) -> TokenizedChunk:
    out = TokenizedChunk()
    for c in chunks:
        out.ids += c.ids
        out.labels += c.labels
        out.images += c.images
        out.sources += c.sources
        out.errors += c.errors
        out.records += c.records
        out.truncated += c.truncated
        out.dropped_image_cut += c.dropped_image_cut
        out.dropped_no_loss += c.dropped_no_loss
    return out


def tokenize_files(
    tokenizer, settings: TokenizeSettings, files: list[str], media_root: str | None, *,
    num_workers: int = 0, skip_errors: bool = False, chunk_lines: int = 512, convert=None,
) -> TokenizedChunk:
    """Tokenise every record of `files` (in file, then line order), in `num_workers` processes."""
    if is_slow(tokenizer):  # Python tokenizers are slow: smaller chunks spread one file over the workers
        chunk_lines = min(chunk_lines, SLOW_CHUNK_LINES)
    jobs = []
    for f in files:
        root = media_root if media_root is not None else os.path.dirname(f)
        try:
            lines = list(iter_file(f))
        except DataError as e:
            if not skip_errors:
                raise
            jobs.append((f, [], root, str(e)))
            continue
        for i in range(0, len(lines), chunk_lines):
            jobs.append((f, lines[i:i + chunk_lines], root, None))

    def as_error(msg):
        c = TokenizedChunk()
        c.errors.append(msg)
        return c

    if num_workers <= 1 or len(jobs) <= 1:
        return merge_chunks([
            as_error(err) if err else tokenize_lines(tokenizer, settings, f, ls, root, skip_errors, convert=convert)
            for f, ls, root, err in jobs
        ])
    # fork (as torch's DataLoader does): workers start instantly instead of re-importing torch and
    # transformers; they only run the tokenizer, never CUDA or collectives. spawn where fork is absent.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        max_workers=min(num_workers, len(jobs)), mp_context=mp.get_context(method),
        initializer=_worker_init, initargs=(tokenizer, settings),
    ) as pool:
        futures = [
            None if err else pool.submit(_worker_run, f, ls, root, skip_errors, convert) for f, ls, root, err in jobs
        ]
        return merge_chunks([
            as_error(job[3]) if fut is None else fut.result() for job, fut in zip(jobs, futures)
        ])
