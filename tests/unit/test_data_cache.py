"""The data cache: where it lives (data.cache_dir, $XTUNE_CACHE, ~/.cache/xtune/data), what makes a new
entry (the files' content, the tokenizer), data files hashed once per version of the file; and the chat
template a tokenizer without one of its own gets (the family's built-in one, or data.template)."""

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import xtune.data.cache as cache_mod
from tests.conftest import TOKENIZERS
from xtune.data.dataset import load_dataset

CONV = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}]


def entries(root):
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []


def load(spec, tok):
    return load_dataset(spec.data.datasets[0], tok, spec.data, spec.model)


def test_cache_dir_setting_then_xtune_cache_then_home(qwen_tok, write_jsonl, run_spec, tmp_path, monkeypatch):
    path = write_jsonl("c.jsonl", [{"messages": CONV}])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XTUNE_CACHE", str(tmp_path / "env"))
    assert load(run_spec([("c", path)], cache_dir=str(tmp_path / "set")), qwen_tok).built
    assert len(entries(tmp_path / "set")) == 1 and not entries(tmp_path / "env")  # data.cache_dir wins
    assert load(run_spec([("c", path)], cache_dir=None), qwen_tok).built
    assert len(entries(tmp_path / "env")) == 1
    assert not load(run_spec([("c", path)], cache_dir=None), qwen_tok).built  # found there the next time
    monkeypatch.delenv("XTUNE_CACHE")
    assert load(run_spec([("c", path)], cache_dir=None), qwen_tok).built
    assert len(entries(tmp_path / "home" / ".cache" / "xtune" / "data")) == 1


def test_a_changed_tokenizer_makes_a_new_entry(qwen_tok, write_jsonl, run_spec):
    path = write_jsonl("c.jsonl", [{"messages": [CONV[0], {"role": "assistant", "content": "<xtune_new> Blue."}]}])
    spec = run_spec([("c", path)])
    first = load(spec, qwen_tok)
    assert first.built
    same = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen3_tiny")
    assert not load(spec, same).built  # the same tokenizer loaded again: the entry is reused
    changed = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen3_tiny")
    changed.add_tokens(["<xtune_new>"])
    again = load(spec, changed)
    assert again.built and len(entries(Path(spec.data.cache_dir))) == 2
    new_id = changed.convert_tokens_to_ids("<xtune_new>")
    assert new_id in again.ids.tolist() and new_id not in first.ids.tolist()  # the old entry would be wrong


def test_data_files_are_hashed_once_per_version(qwen_tok, write_jsonl, run_spec, monkeypatch):
    """Every rank computes the key at each start: the content hash is read back while the file's size,
    mtime, ctime and inode are unchanged; any change hashes it again (the key stays content-based)."""
    hashed = []
    real_hash = cache_mod.file_hash
    monkeypatch.setattr(cache_mod, "file_hash", lambda p: hashed.append(p) or real_hash(p))
    path = write_jsonl("c.jsonl", [{"messages": CONV}])
    spec = run_spec([("c", path)])
    assert load(spec, qwen_tok).built and len(hashed) == 1
    assert not load(spec, qwen_tok).built and len(hashed) == 1  # stat only
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again, same entry
    assert not load(spec, qwen_tok).built and len(hashed) == 2
    # same size, mtime put back: the ctime still tells the change
    st = os.stat(path)
    path.write_text(path.read_text().replace("Blue", "Gray"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    ds = load(spec, qwen_tok)
    assert ds.built and len(hashed) == 3
    assert qwen_tok.decode(ds.ids.tolist()).count("Gray") == 1


@pytest.mark.parametrize("template,family,reference", [
    ("auto", "qwen3", "qwen3_tiny"),  # the family's built-in template
    ("auto", "intern_s1", "intern_s1_tiny"),
    ("intern_s1", "qwen3", "intern_s1_tiny"),  # data.template names another one
    ("qwen3", "intern_s1", "qwen3_tiny"),
])
def test_tokenizer_without_template_gets_the_builtin_one(template, family, reference, write_jsonl, run_spec):
    bare = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen3_tiny")
    bare.chat_template = None
    path = write_jsonl("c.jsonl", [{"messages": CONV}])
    ds = load(run_spec([("c", path)], model=dict(family=family), template=template), bare)
    # reference: transformers renders with the template the shipped tokenizer folder carries
    rendered = {name: bare.apply_chat_template(CONV, tokenize=True, return_dict=False,
                                               chat_template=AutoTokenizer.from_pretrained(TOKENIZERS / name).chat_template)
                for name in ("qwen3_tiny", "intern_s1_tiny")}
    assert rendered["qwen3_tiny"] != rendered["intern_s1_tiny"]  # so the choice shows
    assert ds.ids.tolist() == list(rendered[reference])


def test_tokenizer_own_template_wins_over_data_template(qwen_tok, write_jsonl, run_spec):
    path = write_jsonl("c.jsonl", [{"messages": CONV}])
    ds = load(run_spec([("c", path)], model=dict(family="intern_s1"), template="intern_s1"), qwen_tok)
    assert ds.ids.tolist() == list(qwen_tok.apply_chat_template(CONV, tokenize=True, return_dict=False))
