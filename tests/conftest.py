"""Shared fixtures. Data: the shipped tiny tokenizers, the shared resource files, JSONL writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "src" / "xtune" / "assets" / "tokenizers"
RESOURCE = ROOT.parent / "shared" / "data" / "resource"


@pytest.fixture(scope="session")
def qwen_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / "qwen3_tiny")


@pytest.fixture(scope="session")
def intern_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / "intern_s1_tiny")


@pytest.fixture
def resource_dir():
    """The shared real example files (../shared/data/resource); skips when absent."""
    if not RESOURCE.is_dir():
        pytest.skip("shared resource data not present")
    return RESOURCE


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, records) -> path; a record that is a str is written as the raw line."""

    def write(name, records):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write


@pytest.fixture
def make_image(tmp_path):
    """make_image(name, w, h) -> path of an RGB PNG with a gradient (deterministic pixels)."""

    def make(name, w, h):
        import numpy as np
        from PIL import Image

        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1).astype("uint8")
        path = tmp_path / name
        Image.fromarray(arr).save(path)
        return path

    return make


@pytest.fixture
def run_spec(tmp_path):
    """run_spec(datasets=[(name, path, kw...)], model=..., train=..., **data) -> RunSpec with a tmp cache."""
    from xtune.config.schema import DatasetSpec, DataSpec, ModelSpec, RunSpec, TrainSpec

    def make(datasets, eval_datasets=(), model=None, train=None, **data):
        def ds(d):
            return d if isinstance(d, DatasetSpec) else DatasetSpec(name=d[0], path=str(d[1]), **(d[2] if len(d) > 2 else {}))

        data.setdefault("cache_dir", str(tmp_path / "cache"))
        data.setdefault("num_workers", 0)
        return RunSpec(
            model=ModelSpec(**(model or {})),
            data=DataSpec(datasets=[ds(d) for d in datasets], eval_datasets=[ds(d) for d in eval_datasets], **data),
            train=TrainSpec(**(train or {})),
        )

    return make


@pytest.fixture(scope="session")
def s1_tok_dir(tmp_path_factory):
    """A tokenizer folder like Intern-S1-mini's: remote-code Python tokenizer, SMILES sub-tokenizer (tests/s1_fixture.py)."""
    pytest.importorskip("sentencepiece")
    from tests.s1_fixture import build_s1_tokenizer

    return build_s1_tokenizer(tmp_path_factory.mktemp("s1_tokenizer"))


@pytest.fixture(scope="session")
def s1_tok(s1_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(s1_tok_dir, trust_remote_code=True, local_files_only=True)


# The longest files (seconds of test time in a quiet `make test` on 2 cores, `--durations`, 2026-12-01), run first.
# `make test` gives whole files to two workers in this order (`--dist loadfile --no-loadscope-reorder`); a long
# file started last would leave one worker alone at the end. Files not listed keep pytest's order after these.
LONGEST_FIRST = (
    "tests/integration/test_cli.py",  # 108
    "tests/reliability/test_bad_input_table.py",  # ~100
    "tests/integration/test_lora_families.py",  # 100
    "tests/reliability/test_elastic_resume.py",  # 73
    "tests/integration/test_model_families.py",  # 68
    "tests/integration/test_demo.py",  # 66
    "tests/unit/test_config.py",  # ~55
    "tests/distributed/test_engine_optimizers.py",  # 49
    "tests/reliability/test_orphans_and_lock.py",  # 48
    "tests/reliability/test_checkpoint_cli.py",  # 42
    "tests/unit/test_qlora_load.py",  # 41
    "tests/reliability/test_kill_resume.py",  # 41
    "tests/integration/test_remote_tokenizer_run.py",  # 38
    "tests/reliability/test_sigterm_launcher.py",  # 37
    "tests/reliability/test_lora_resume.py",  # 37
    "tests/distributed/test_engine_fp16.py",  # 36
    "tests/integration/test_dpo_run.py",  # 35
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: order within a file kept
