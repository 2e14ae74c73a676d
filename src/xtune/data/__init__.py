"""Data stage: JSONL -> chat template + labels (cached) -> mix -> pack -> resumable loader.

Public entry points (see docs/CONTRACTS.md): `build_train_loader`, `build_eval_batches`,
`multimodal.load_tiles`, `inspect.inspect_data`. The two loaders are imported on first call (lazy, to break
what would be a cycle: every `xtune.data.*` module imports this package first, and the loader imports most of
them; it also keeps the plain-Python modules, records, sources, convert, free of torch).
"""

from xtune.config.schema import RunSpec


def build_train_loader(spec: RunSpec, tokenizer, **kw):
    from xtune.data.loader import build_train_loader as f

    return f(spec, tokenizer, **kw)


def build_eval_batches(spec: RunSpec, tokenizer, **kw):
    from xtune.data.loader import build_eval_batches as f

    return f(spec, tokenizer, **kw)
