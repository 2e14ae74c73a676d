"""Python ("slow") tokenizers: Intern-S1-like remote code (tests/s1_fixture.py), loaded only by consent.

References are independent of the code under test: `apply_chat_template` of the same tokenizer for the
ids, and the shipped fast tiny Intern-S1 tokenizer (same BPE, Rust offsets) for which tokens are trained.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.s1_fixture import MODULE_FILE
from xtune.config.schema import ModelSpec
from xtune.config.validate import model_problems
from xtune.data.records import parse_record
from xtune.data.slow_tokenize import encode_trained
from xtune.data.templates import resolve_template
from xtune.data.tokenize import SampleTokenizer, TokenizedChunk, TokenizeSettings
from xtune.data.tokenize_files import tokenize_files

DEMO = Path(__file__).resolve().parents[2] / "src" / "xtune" / "assets" / "demo"
SMILES_CHATS = [
    [{"role": "user", "content": "What is <SMILES>CC(=O)OC1=CC=CC=C1C(=O)O</SMILES>?"},
     {"role": "assistant", "content": "Aspirin: <SMILES>CC(=O)OC1=CC=CC=C1C(=O)O</SMILES>."}],
    [{"role": "system", "content": "Chemist."}, {"role": "user", "content": "Ethanol?"},
     {"role": "assistant", "content": "<SMILES>CCO</SMILES>"}, {"role": "user", "content": "Benzene?"},
     {"role": "assistant", "content": "\n\n<SMILES>C1=CC=CC=C1</SMILES> é"}],
]


def _tokenize(tok, msgs, **settings):
    st = SampleTokenizer(tok, TokenizeSettings(resolve_template(tok, "auto", "intern_s1"), 8192, **settings))
    out = TokenizedChunk()
    st.tokenize([parse_record("t.jsonl", 1, json.dumps({"messages": msgs}), ".")], out)
    return out.ids[0].tolist(), out.labels[0].tolist()


def _targets(ids, labels):
    return [ids[i + 1] for i in range(len(ids) - 1) if labels[i] != -100]


def test_fixture_is_slow_remote_code_and_no_tokenizer_json(s1_tok_dir, s1_tok):
    assert not (s1_tok_dir / "tokenizer.json").exists()
    assert not s1_tok.is_fast and getattr(s1_tok, "backend_tokenizer", None) is None
    assert type(s1_tok).__module__.startswith("transformers_modules.")
    ids = s1_tok.encode("x <SMILES>CCO</SMILES>", add_special_tokens=False)
    assert max(ids) >= s1_tok.smiles_offset  # sentencepiece piece ids, after the BPE and added tokens


def test_ids_equal_apply_chat_template_and_labels_equal_the_fast_path(s1_tok, intern_tok):
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:60] + (DEMO / "eval.jsonl").read_text().splitlines()[:20]
    for line in lines:
        msgs = json.loads(line)["messages"]
        ids, labels = _tokenize(s1_tok, msgs)
        assert ids == list(s1_tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
        fast_ids, fast_labels = _tokenize(intern_tok, msgs)  # same BPE: same ids on text without SMILES
        assert (ids, labels) == (fast_ids, fast_labels)


@pytest.mark.parametrize("k", range(len(SMILES_CHATS)))
def test_smiles_spans_use_the_sub_tokenizer_and_labels_cover_the_answers(s1_tok, k):
    msgs = SMILES_CHATS[k]
    ids, labels = _tokenize(s1_tok, msgs)
    assert ids == list(s1_tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    expect = []
    for m in msgs:
        if m["role"] == "assistant":
            expect += s1_tok.encode(m["content"] + "<|im_end|>", add_special_tokens=False)
    assert _targets(ids, labels) == expect


def test_tokens_straddling_span_boundaries_follow_the_first_character_rule(s1_tok, intern_tok):
    # Spans cut words in the middle: the per-piece encoding differs from the whole text's, so the
    # decoding fallback places the tokens; the fast tokenizer's Rust offsets give the reference.
    text = "The quick brown fox jumps over the lazy dog, again and again.\n\n\nDone."
    spans = [(6, 13), (22, 40), (64, 68)]
    ids, trained = encode_trained(s1_tok, text, spans)
    enc = intern_tok.backend_tokenizer.encode(text, add_special_tokens=False)
    assert ids == enc.ids
    starts = np.array([o[0] for o in enc.offsets])
    ref = np.zeros(len(ids), bool)
    for a, b in spans:
        ref |= (starts >= a) & (starts < b)
    assert trained.tolist() == ref.tolist()


def test_slow_path_in_worker_processes_equals_one_process(s1_tok, write_jsonl):
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:150]
    recs = [json.loads(x) for x in lines] + [{"messages": m} for m in SMILES_CHATS]
    path = write_jsonl("d.jsonl", recs)
    settings = TokenizeSettings(resolve_template(s1_tok, "auto", "intern_s1"), 4096)
    one = tokenize_files(s1_tok, settings, [str(path)], None, num_workers=0)
    two = tokenize_files(s1_tok, settings, [str(path)], None, num_workers=2)
    assert len(one.ids) == len(recs)
    assert [x.tolist() for x in one.ids] == [x.tolist() for x in two.ids]
    assert [x.tolist() for x in one.labels] == [x.tolist() for x in two.labels]


def test_remote_code_needs_consent_at_validation(s1_tok_dir):
    spec = ModelSpec(name="t", family="intern_s1", tokenizer=str(s1_tok_dir), arch={"a": 1})
    problems = model_problems(spec)
    assert len(problems) == 1
    assert str(s1_tok_dir / MODULE_FILE) in problems[0] and "model.trust_remote_code=true" in problems[0]
    assert model_problems(ModelSpec(name="t", family="intern_s1", tokenizer=str(s1_tok_dir), arch={"a": 1},
                                    trust_remote_code=True)) == []
    # a tokenizers-backed folder needs no consent
    assert model_problems(ModelSpec(name="t", family="intern_s1", tokenizer="builtin:intern_s1_tiny", arch={"a": 1})) == []


def test_load_tokenizer_refuses_remote_code_without_consent(s1_tok_dir):
    from xtune.errors import XtuneError
    from xtune.models import get_adapter

    spec = ModelSpec(name="t", family="intern_s1", tokenizer=str(s1_tok_dir), arch={"a": 1})
    with pytest.raises(XtuneError, match="model.trust_remote_code=true"):
        get_adapter(spec).load_tokenizer()
    tok = get_adapter(ModelSpec(name="t", family="intern_s1", tokenizer=str(s1_tok_dir), arch={"a": 1},
                                trust_remote_code=True)).load_tokenizer()
    assert type(tok).__name__ == "S1FixtureTokenizer"


@pytest.mark.parametrize("tok_name", ["qwen_tok", "s1_tok"])
def test_strip_empty_think_both_ways(tok_name, request):
    # Qwen3's template (built in; the s1 fixture gets it too) puts an empty think block in the last turn.
    from xtune.data.templates import builtin_template

    tok = request.getfixturevalue(tok_name)
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    template = builtin_template("qwen3")
    rendered = tok.apply_chat_template(msgs, chat_template=template, tokenize=False)
    assert "<think>\n\n</think>\n\n6" in rendered
    ref_ids = tok.encode(rendered, add_special_tokens=False)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    for strip, last in ((False, "<think>\n\n</think>\n\n6<|im_end|>"), (True, "6<|im_end|>")):
        st = SampleTokenizer(tok, TokenizeSettings(template, 4096, strip_empty_think=strip))
        out = TokenizedChunk()
        st.tokenize([parse_record("t.jsonl", 1, json.dumps({"messages": msgs}), ".")], out)
        ids, labels = out.ids[0].tolist(), out.labels[0].tolist()
        assert ids == ref_ids  # the ids never change: only what is trained
        assert _targets(ids, labels) == enc("4<|im_end|>") + enc(last)
    # a think block with reasoning is trained either way
    msgs[-1]["reasoning_content"] = "add"
    st = SampleTokenizer(tok, TokenizeSettings(template, 4096, strip_empty_think=True))
    out = TokenizedChunk()
    st.tokenize([parse_record("t.jsonl", 1, json.dumps({"messages": msgs}), ".")], out)
    assert _targets(out.ids[0].tolist(), out.labels[0].tolist())[-len(enc("<think>\nadd\n</think>\n\n6<|im_end|>")):] \
        == enc("<think>\nadd\n</think>\n\n6<|im_end|>")
