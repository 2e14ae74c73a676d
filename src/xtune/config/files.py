"""Checks of the files and folders a spec names, before anything is loaded: the model folder (config.json, the
weights), the tokenizer folder (its files, remote code, its vocabulary against the model's), the datasets and
the checkpoint to resume. Each problem names the key, the path and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

from xtune.config.families import folder_config
from xtune.config.model_checks import arch_problems, no_safetensors_message
from xtune.config.resources import assets_dir
from xtune.config.schema import ModelSpec, RunSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
DATASET_FORMATS = ("auto", "messages", "alpaca", "sharegpt", "text")


def tokenizer_dir(m: ModelSpec) -> Path | None:
    """The tokenizer folder: model.tokenizer, else load_from; `builtin:NAME` is shipped with xtune."""
    tok = m.tokenizer or m.load_from
    if tok is None:
        return None
    if tok.startswith("builtin:"):
        return assets_dir() / "tokenizers" / tok.split(":", 1)[1]
    return Path(tok).expanduser()


def model_file_problems(m: ModelSpec, found: list[str]) -> list[str]:
    """The model and tokenizer folders of the model section (`found`: the section's problems so far, so that a
    missing load_from folder is named once)."""
    problems: list[str] = arch_problems(m)
    if m.load_from is not None:
        folder = Path(m.load_from).expanduser()
        if not folder.is_dir():
            problems.append(f"model.load_from={m.load_from}: no such folder")
        elif not (folder / "config.json").is_file():
            problems.append(f"model.load_from={m.load_from}: no config.json there (not a Hugging Face model folder)")
        elif not any((folder / f).is_file() for f in WEIGHTS_FILES):
            problems.append(no_safetensors_message(m, " or ".join(WEIGHTS_FILES)))
        else:
            for name in ("config.json", WEIGHTS_FILES[1]):
                bad = _json_problem(folder / name)
                if bad:
                    problems.append(f"model.load_from={m.load_from}: {name} is not valid JSON ({bad}); "
                                    "copy or download it again")
    tok = tokenizer_dir(m)
    key = "model.tokenizer" if m.tokenizer else "model.load_from"
    if tok is None and m.arch:
        problems.append("model.tokenizer is null and model.load_from is null: give a tokenizer folder or builtin:NAME")
    elif tok is None:
        pass  # already reported: model.load_from is required
    elif not tok.is_dir():
        if m.tokenizer and m.tokenizer.startswith("builtin:"):
            shipped = sorted(p.name for p in (assets_dir() / "tokenizers").glob("*") if p.is_dir())
            problems.append(f"model.tokenizer={m.tokenizer}: no such built-in tokenizer; choose one of "
                            f"{', '.join('builtin:' + s for s in shipped)}")
        elif not (key == "model.load_from" and any(m.load_from in p for p in found + problems)):
            problems.append(f"{key}={tok}: no such folder")
    elif not any((tok / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"{key}={tok}: no tokenizer files there (expected one of {', '.join(TOKENIZER_FILES)})")
    else:
        problems.extend(filter(None, [remote_code_problem(m)]))
    return problems


def remote_code_problem(m: ModelSpec) -> str | None:
    """The message when the tokenizer folder would run its own Python code and model.trust_remote_code is false."""
    tok = tokenizer_dir(m)
    code = None if m.trust_remote_code or tok is None else remote_tokenizer_code(tok)
    if code is None:
        return None
    key = "model.tokenizer" if m.tokenizer else "model.load_from"
    return (f"{key}={tok}: its tokenizer is remote code: loading it runs {code} (auto_map in "
            f"tokenizer_config.json). Read that file; to allow it, set model.trust_remote_code=true")


def remote_tokenizer_code(folder: Path) -> Path | None:
    """The .py file AutoTokenizer would import from `folder` (its tokenizer_config.json's auto_map), or None
    when the folder needs no code of its own. Decided as transformers 5 does (AutoTokenizer.from_pretrained):
    an `auto_map` AutoTokenizer entry is used unless `tokenizer_class` names a class transformers ships."""
    path = folder / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    refs = auto_map if isinstance(auto_map, (list, tuple)) else (auto_map or {}).get("AutoTokenizer")
    if not refs:
        return None
    refs = [refs] if isinstance(refs, str) else refs
    ref = refs[1] if len(refs) > 1 and refs[1] else refs[0]
    if not ref:
        return None
    cls = cfg.get("tokenizer_class")
    if cls:
        # Lazy: transformers (seconds to import, with torch) stays out of the config stage, so `xtune config`,
        # --dry-run and every configuration error answer without it; only a folder with auto_map gets here.
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        base = cls.removesuffix("Fast")
        if tokenizer_class_from_name(base) is not None or tokenizer_class_from_name(base + "Fast") is not None:
            return None
    module = ref.split("--")[-1].rsplit(".", 1)[0]  # "repo--module.Class" or "module.Class"
    return folder / (module.replace(".", "/") + ".py")


def _json_problem(path: Path) -> str | None:
    """Why `path` (when it exists) is not a JSON object, with the line and column; None when it is one."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    except (OSError, UnicodeDecodeError) as e:
        return str(e)
    return None if isinstance(obj, dict) else "not a JSON object"


def vocab_problem(m: ModelSpec, tokenizer) -> str | None:
    """The tokenizer's largest id must be a row of the model's embedding (vocab_size of load_from's
    config.json, else of model.arch); checked once the tokenizer is loaded, before the model is built."""
    if tokenizer is None:  # a caller that tokenises nothing itself (the engine tests' hand-made batches)
        return None
    cfg = {**(folder_config(m.load_from) or {}), **dict(m.arch or {})}
    vocab = cfg.get("vocab_size") or dict(cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        return None
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest < vocab:
        return None
    where = f"{m.load_from}/config.json" if m.load_from else "model.arch"
    return (f"model vocab_size {vocab} ({where}) is smaller than the tokenizer's largest id {largest} "
            f"({tokenizer_dir(m)}): use the model's own tokenizer, or a model whose vocabulary covers it")


DATASET_FORMATS = ("auto", "messages", "alpaca", "sharegpt", "text")


def file_problems(spec: RunSpec) -> list[str]:
    problems: list[str] = []
    d, t = spec.data, spec.train
    for group, items in (("data.datasets", d.datasets), ("data.eval_datasets", d.eval_datasets)):
        for i, ds in enumerate(items):
            if not ds.path.startswith("hf://") and not Path(ds.path).expanduser().exists():
                problems.append(f"{group}[{i}] ({ds.name}).path={ds.path}: no such file or folder")
            if ds.format not in DATASET_FORMATS:
                problems.append(f"{group}[{i}] ({ds.name}).format={ds.format}: choose one of {', '.join(DATASET_FORMATS)}")
            if ds.media_root is not None and not Path(ds.media_root).expanduser().is_dir():
                problems.append(f"{group}[{i}] ({ds.name}).media_root={ds.media_root}: no such folder")
    if t.resume not in (None, "auto") and not Path(t.resume).expanduser().exists():
        problems.append(f"train.resume={t.resume}: no such checkpoint folder (use auto, null or a checkpoint path)")
    return problems
