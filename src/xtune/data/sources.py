"""Where records come from: a .jsonl / .json / .parquet / .arrow file, a folder of them, a `datasets.save_to_disk`
folder, or a hub dataset `hf://org/name[:split]` (read with `datasets.load_dataset`; offline from the HF cache).

Every source becomes a list of files (so the data cache hashes their bytes), and each file yields
(locator, JSON text) pairs: the locator is a line number for JSONL (errors read file:line) and `row N` /
`record N` for parquet, arrow and JSON files (errors read file:row N).
- JSONL is read line by line here: no conversion pass, and the line numbers stay.
- parquet is read batch by batch with pyarrow (what `datasets` itself uses); `datasets` would first copy it
  into an arrow cache, a slower cold start for the same rows.
- arrow files (save_to_disk shards, the hub cache) are memory-mapped with `datasets.Dataset.from_file`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from xtune.data.records import iter_lines
from xtune.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
HF_PREFIX = "hf://"


def list_files(path: str) -> list[str]:
    """The files of one dataset path, in a fixed order (sorted; a save_to_disk folder in its own shard order)."""
    if path.startswith(HF_PREFIX):
        return _hub_files(path)
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix not in EXTENSIONS:
            raise DataError(f"{path}: unsupported file type {p.suffix or '(none)'} (expected {', '.join(EXTENSIONS)})")
        return [str(p)]
    if p.is_dir():
        state = p / "state.json"
        if state.is_file() and (p / "dataset_info.json").is_file():  # datasets.save_to_disk
            shards = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
            return [str(p / s) for s in shards]
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS
                       and not f.name.startswith("."))
        if not files:
            raise DataError(f"{path}: no data file in this folder ({', '.join('*' + e for e in EXTENSIONS)})")
        return files
    raise DataError(f"{path}: no such file or folder")


def _hub_files(path: str) -> list[str]:
    """hf://org/name[:split] -> the arrow files of that split in the local HF cache (load_dataset builds them)."""
    name, _, split = path[len(HF_PREFIX):].partition(":")
    try:  # lazy: datasets is an optional extra (xtune[datasets])
        import datasets
    except ImportError:
        raise DataError(f"{path}: hub datasets need the `datasets` package: pip install 'xtune[datasets]'") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 (offline, unknown name, unknown split: all user-fixable)
        raise DataError(f"{path}: could not load dataset {name!r} split {split or 'train'!r}: {e}") from None
    return [f["filename"] for f in ds.cache_files]


def iter_file(file: str) -> Iterator[tuple[object, str]]:
    """(locator, JSON text) for every record of one file; an empty file is an error."""
    suffix = Path(file).suffix
    reader = {".parquet": _parquet, ".arrow": _arrow, ".json": _json}.get(suffix)
    if reader is None:
        yield from iter_lines(file)
        return
    n = 0
    for item in reader(file):
        n += 1
        yield item
    if n == 0:
        raise DataError(f"{file}:0: empty file (no records)")


def _rows(batches, file: str) -> Iterator[tuple[str, str]]:
    i = 0
    for batch in batches:
        for row in batch:
            yield f"row {i}", json.dumps(row, default=str)
            i += 1


def _need_datasets(file: str) -> DataError:
    return DataError(f"{file}: reading parquet / arrow needs the `datasets` package: pip install 'xtune[datasets]'")


def _parquet(file: str):
    try:  # lazy: pyarrow comes with the optional datasets extra
        import pyarrow.parquet as pq
    except ImportError:
        raise _need_datasets(file) from None

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{file}: not a readable parquet file ({e})") from None
    return _rows((b.to_pylist() for b in pf.iter_batches(batch_size=1024)), file)


def _arrow(file: str):
    try:  # lazy: datasets is an optional extra (xtune[datasets])
        from datasets import Dataset
    except ImportError:
        raise _need_datasets(file) from None

    try:
        ds = Dataset.from_file(file)  # memory-mapped
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{file}: not a readable arrow file ({e})") from None
    return _rows((ds.select(range(i, min(i + 1024, len(ds)))).to_list() for i in range(0, len(ds), 1024)), file)


def _json(file: str):
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{file}: a .json dataset must be a list of records (or {{\"data\": [...]}})")
    return ((f"record {i}", json.dumps(r)) for i, r in enumerate(obj))
