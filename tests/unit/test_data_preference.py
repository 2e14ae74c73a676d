"""Preference data: TRL's explicit and implicit conversational forms, rendered exactly as apply_chat_template,
labels on the responses only, located errors, truncation, and packing of a pair into one row."""

import dataclasses
import json

import numpy as np
import pytest

from xtune.data.loader import PackedData
from xtune.data.types import IGNORE_INDEX
from xtune.errors import DataError

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is the capital of France?"}
GOOD = {"role": "assistant", "content": "Paris."}
BAD = {"role": "assistant", "content": "Lyon, I think."}


def _spec(run_spec, path, **data):
    spec = run_spec([("pref", path)], **data)
    return dataclasses.replace(spec, method="dpo")


def _docs(data):
    return [data.item(k) for k in range(2 * len(data.items))]


def _trained_text(tok, ids, labels):
    ids, labels = [int(t) for t in ids], [int(t) for t in labels]
    return tok.decode([ids[i + 1] for i in range(len(ids) - 1) if labels[i] != IGNORE_INDEX])


def test_explicit_and_implicit_forms_render_as_the_chat_template(run_spec, write_jsonl, qwen_tok):
    path = write_jsonl("p.jsonl", [
        {"prompt": [SYS, USER], "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [SYS, USER, GOOD], "rejected": [SYS, USER, BAD]},
    ])
    data = PackedData(_spec(run_spec, path, pack_max_length=512, sample_max_length=256).data.datasets,
                      _spec(run_spec, path, pack_max_length=512, sample_max_length=256), qwen_tok,
                      shuffle=False, verbose=False)
    docs = _docs(data)
    assert len(docs) == 4
    for k, resp in enumerate([GOOD, BAD, GOOD, BAD]):
        ids, labels, _ = docs[k]
        expected = qwen_tok.apply_chat_template([SYS, USER, resp], tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert [int(t) for t in ids] == list(expected)
        # Only the response is trained: its content, closed by the end-of-turn token.
        text = _trained_text(qwen_tok, ids, labels)
        assert resp["content"] in text and text.rstrip().endswith("<|im_end|>")
        assert "France" not in text and "Be brief" not in text and "assistant" not in text
    # The two halves of a pair share their untrained prompt tokens.
    (c_ids, c_lab, _), (r_ids, r_lab, _) = docs[0], docs[1]
    p = next(i for i, t in enumerate(c_lab) if t != IGNORE_INDEX)
    assert list(c_ids[:p + 1]) == list(r_ids[:p + 1]) and next(i for i, t in enumerate(r_lab) if t != IGNORE_INDEX) == p


@pytest.mark.parametrize("record, message", [
    ({"prompt": [USER], "rejected": [BAD]}, "no 'chosen' key"),
    ({"prompt": [USER], "chosen": [GOOD]}, "no 'rejected' key"),
    ({"messages": [USER, GOOD]}, "this looks like SFT data"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]}, "'chosen' and 'rejected' are identical"),
    ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "empty 'chosen' response"),
    ({"chosen": [SYS, USER, GOOD], "rejected": [USER, BAD]}, "share no common prefix"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": "  "}], "rejected": [BAD]},
     "empty 'chosen' response"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": []}, "empty 'rejected' response"),
])
def test_bad_pairs_are_located_errors(run_spec, write_jsonl, qwen_tok, record, message):
    good = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    path = write_jsonl("bad.jsonl", [good, good, record])
    spec = _spec(run_spec, path)
    with pytest.raises(DataError) as e:
        PackedData(spec.data.datasets, spec, qwen_tok, shuffle=False, verbose=False)
    assert f"{path}:3" in str(e.value) and message in str(e.value)


def test_long_pairs_keep_the_end_of_the_prompt_and_the_start_of_the_responses(run_spec, write_jsonl, qwen_tok):
    long_prompt = {"role": "user", "content": " ".join(f"word{i}" for i in range(200)) + " END_OF_PROMPT"}
    chosen = {"role": "assistant", "content": "START_OF_CHOSEN " + "yes " * 100}
    rejected = {"role": "assistant", "content": "START_OF_REJECTED " + "no " * 150}
    path = write_jsonl("long.jsonl", [{"prompt": [long_prompt], "chosen": [chosen], "rejected": [rejected]}])
    spec = _spec(run_spec, path, sample_max_length=128, pack_max_length=256)
    data = PackedData(spec.data.datasets, spec, qwen_tok, shuffle=False, verbose=False)
    assert data.datasets[0].truncated == 1
    (c_ids, c_lab, _), (r_ids, r_lab, _) = _docs(data)
    assert len(c_ids) == len(r_ids) == 128  # the limit, both halves
    for ids, lab, start in ((c_ids, c_lab, "START_OF_CHOSEN"), (r_ids, r_lab, "START_OF_REJECTED")):
        p = next(i for i, t in enumerate(lab) if t != IGNORE_INDEX) + 1
        prompt, response = qwen_tok.decode([int(t) for t in ids[:p]]), qwen_tok.decode([int(t) for t in ids[p:]])
        assert "END_OF_PROMPT" in prompt and "word0 " not in prompt  # the prompt's end is kept
        assert start in response  # the response's start is kept
        assert p >= 64  # the prompt keeps at least half of the limit


def test_a_pair_is_two_isolated_documents_of_one_row(run_spec, write_jsonl, qwen_tok):
    recs = [{"prompt": [{"role": "user", "content": f"q{i} " * (1 + i % 7)}],
             "chosen": [{"role": "assistant", "content": f"good {i} " * (1 + i % 5)}],
             "rejected": [{"role": "assistant", "content": f"bad {i} " * (1 + i % 3)}]} for i in range(40)]
    path = write_jsonl("many.jsonl", recs)
    spec = _spec(run_spec, path, sample_max_length=96, pack_max_length=192)
    data = PackedData(spec.data.datasets, spec, qwen_tok, shuffle=True, verbose=False)
    seen = []
    for r in range(len(data.rows)):
        b = data.batch([r])
        cu = b.cu_seqlens.tolist()
        assert b.pair_docs.shape == (b.num_pairs, 2) and b.num_pairs == len(data.rows[r])
        for (c, rj), pid in zip(b.pair_docs.tolist(), b.pair_ids.tolist()):
            assert rj == c + 1  # consecutive documents, each with its own positions
            for doc in (c, rj):
                assert b.position_ids[0, cu[doc]] == 0 and cu[doc + 1] <= 192
            rec = recs[pid]
            ids = b.input_ids[0, cu[c]:cu[c + 1]].tolist()
            assert f"good {pid}" in qwen_tok.decode(ids)
            assert f"bad {pid}" in qwen_tok.decode(b.input_ids[0, cu[rj]:cu[rj + 1]].tolist())
            seen.append(pid)
            del rec
    assert sorted(seen) == list(range(40))  # every pair exactly once, never split across rows


def test_sft_records_and_pairs_are_cached_apart(run_spec, write_jsonl, qwen_tok):
    path = write_jsonl("p.jsonl", [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}])
    spec = _spec(run_spec, path)
    data = PackedData(spec.data.datasets, spec, qwen_tok, shuffle=False, verbose=False)
    assert data.group == 2 and len(data.datasets[0]) == 2
    with pytest.raises(DataError, match="fits no format .* preference data"):  # the same file read as SFT data
        PackedData(spec.data.datasets, dataclasses.replace(spec, method="sft"), qwen_tok, shuffle=False,
                   verbose=False)
    assert json.loads(path.read_text().splitlines()[0])["chosen"] == [GOOD]
    assert np.asarray(data.datasets[0].labels).size > 0
