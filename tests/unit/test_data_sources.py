"""Data sources (jsonl, json, parquet, arrow / save_to_disk, folders) and formats (messages, alpaca, sharegpt,
text; auto detection; column renames): the same conversations in every form give the tokens of the chat
template applied by the tokenizer itself; bad records are located errors (file:line, file:row N)."""

import json
import logging

import pytest

from xtune.data.dataset import load_dataset
from xtune.data.types import IGNORE_INDEX
from xtune.errors import DataError

PAIRS = [("What is 2 + 3?", "5"), ("Name a colour.", "Blue, like the sky."), ("Say hi", "hi!")]


def as_messages(q, a, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]


def tokens(run_spec, qwen_tok, path, **kw):
    spec = run_spec([("d", path, kw)])
    return load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model, verbose=True)


def reference_ids(tok, messages):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_every_source_and_format_gives_the_template_tokens(tmp_path, run_spec, qwen_tok, write_jsonl, caplog):
    import datasets

    want = [reference_ids(qwen_tok, as_messages(q, a)) for q, a in PAIRS]
    alpaca = [{"instruction": q, "input": "", "output": a} for q, a in PAIRS]
    sharegpt = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS]
    sources = {
        "messages.jsonl": write_jsonl("messages.jsonl", [{"messages": as_messages(q, a)} for q, a in PAIRS]),
        "alpaca.jsonl": write_jsonl("alpaca.jsonl", alpaca),
        "sharegpt.json": tmp_path / "sharegpt.json",
        "dialog.parquet": write_parquet(tmp_path / "dialog.parquet", [{"dialog": as_messages(q, a)} for q, a in PAIRS]),
        "saved": tmp_path / "saved",
    }
    sources["sharegpt.json"].write_text(json.dumps(sharegpt))
    datasets.Dataset.from_list(alpaca).save_to_disk(str(sources["saved"]))
    expected_format = {"messages.jsonl": "messages", "alpaca.jsonl": "alpaca", "sharegpt.json": "sharegpt",
                       "dialog.parquet": "messages", "saved": "alpaca"}
    caplog.set_level(logging.INFO, logger="xtune.data")
    for name, path in sources.items():
        kw = {"columns": {"messages": "dialog"}} if name == "dialog.parquet" else {}
        ds = tokens(run_spec, qwen_tok, path, **kw)
        assert ds.format == expected_format[name], name
        assert [ds.sample(i).input_ids for i in range(len(ds))] == want, name
        assert f"d: format {expected_format[name]} (auto-detected)" in caplog.text
    # Alpaca's input and system fields, sharegpt's system and tool turns.
    rec = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}
    ds = tokens(run_spec, qwen_tok, write_jsonl("a2.jsonl", [rec]), format="alpaca")
    assert ds.sample(0).input_ids == reference_ids(qwen_tok, as_messages("Add\n\n2 and 3", "5", "Be brief."))


HUB_CHILD = """
import json, sys
from xtune.data.sources import list_files, iter_file
from xtune.errors import DataError
for path in sys.argv[1:]:
    try:
        files = list_files(path)
        print(json.dumps({"files": files, "records": [json.loads(r) for f in files for _, r in iter_file(f)]}))
    except DataError as e:
        print(json.dumps({"error": str(e)}))
"""


def test_hub_dataset_is_read_offline_from_the_hf_cache(tmp_path, write_jsonl):
    """`hf://org/name[:split]` on a machine without the hub: `datasets` finds the copy of the dataset that an
    earlier online `load_dataset("org/name")` left in HF_DATASETS_CACHE. That copy is made here the way datasets
    5.2 lays it out (`org___name/default/0.0.0/<hash>/name-<split>.arrow`, checked): built from local JSONL
    files, then moved under the hub name. The records read back are the files' records, per split; an unknown
    name is a DataError naming it."""
    import os
    import shutil
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    splits = {split: [{"messages": as_messages(q + f" ({split})", a)} for q, a in PAIRS] for split in ("train", "test")}
    files = {split: str(write_jsonl(tmp_path / f"{split}.jsonl", rows)) for split, rows in splits.items()}
    build = ("import datasets, json, sys; datasets.load_dataset('json', data_files=json.loads(sys.argv[1]), "
             f"cache_dir={str(tmp_path / 'build')!r})")
    subprocess.run([sys.executable, "-c", build, json.dumps(files)], env=env, check=True, capture_output=True)
    built = next(p for p in (tmp_path / "build" / "json").glob("*/0.0.0/*") if p.is_dir())
    cached = tmp_path / "hf" / "acme___chat" / "default" / "0.0.0" / built.name
    shutil.copytree(built, cached)
    for split in splits:
        (cached / f"json-{split}.arrow").rename(cached / f"chat-{split}.arrow")

    out = subprocess.run([sys.executable, "-c", HUB_CHILD, "hf://acme/chat", "hf://acme/chat:test", "hf://acme/nope"],
                         env=env, check=True, capture_output=True, text=True)
    train, test, unknown = [json.loads(line) for line in out.stdout.splitlines()]
    assert train["records"] == splits["train"] and test["records"] == splits["test"]
    assert all(f.startswith(str(cached)) and f.endswith(".arrow") for f in train["files"] + test["files"])
    assert unknown["error"].startswith("hf://acme/nope: could not load dataset 'acme/nope' split 'train'")


def test_text_format_trains_every_token(run_spec, qwen_tok, write_jsonl):
    text = "Plain text for continued pre-training, every token counts."
    ds = tokens(run_spec, qwen_tok, write_jsonl("t.jsonl", [{"text": text}]))
    assert ds.format == "text"
    s = ds.sample(0)
    ids = qwen_tok(text)["input_ids"]
    assert s.input_ids[:len(ids)] == ids
    assert [x for x in s.labels if x != IGNORE_INDEX] == s.input_ids[1:]


def test_bad_records_are_located(tmp_path, run_spec, qwen_tok, write_jsonl):
    good = {"instruction": "q", "output": "a"}
    path = write_jsonl("bad.jsonl", [good, good, {"instruction": "q"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: alpaca record needs a string 'output'"):
        tokens(run_spec, qwen_tok, path, format="alpaca")
    spec = run_spec([("d", path, {"format": "alpaca"})], on_error="skip")
    skipped = load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model)
    assert len(skipped) == 2 and len(skipped.errors) == 1 and "bad.jsonl:3: alpaca" in skipped.errors[0]
    pq = write_parquet(tmp_path / "rows.parquet", [{"conversations": [{"from": "human", "value": "q"},
                                                                       {"from": "gpt", "value": "a"}]},
                                                    {"conversations": [{"from": "robot", "value": "q"}]}])
    with pytest.raises(DataError, match=r"rows\.parquet:row 1: conversations\[0\]: unknown speaker 'robot'"):
        tokens(run_spec, qwen_tok, pq)
    with pytest.raises(DataError, match=r"odd\.jsonl:1: format auto: the record fits no format \(keys \['foo'\]\)"):
        tokens(run_spec, qwen_tok, write_jsonl("odd.jsonl", [{"foo": 1}]))
