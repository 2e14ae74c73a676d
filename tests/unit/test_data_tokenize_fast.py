"""The fast data path equals transformers' own: rendering, special ids, worker results.

`Renderer.render` uses a template compiled once per process in a sandbox with short-cut checks
(`xtune.data.fast_render`); it must return exactly what `apply_chat_template` does and fall back to
`apply_chat_template` where it does not apply. Its sandbox decisions: tests/unit/test_data_fast_render.py.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from xtune.data import multimodal
from xtune.data.records import iter_lines, parse_record
from xtune.data.templates import Renderer, resolve_template
from xtune.data.tokenize import SampleTokenizer, TokenizedChunk, TokenizeSettings
from xtune.data.tokenize_files import tokenize_files
from xtune.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "xtune" / "assets" / "demo"
RESOURCE = ROOT.parent / "shared" / "data" / "resource"  # as in conftest; optional here
FAMILY = {"qwen_tok": "qwen3", "intern_tok": "intern_s1"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
EXTRA = [
    [{"role": "system", "content": "S"}, {"role": "user", "content": "<tool_response>x</tool_response>"},
     {"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "reasoning_content": None}],
    [{"role": "user", "content": "call"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
     {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "unicode: héllo 世界 {{ not jinja }} {% raw %}"}, {"role": "assistant", "content": ""}],
]


def _records(path: Path, media_root: str):
    out = []
    for lineno, line in iter_lines(str(path)):
        try:
            out.append(parse_record(str(path), lineno, line, media_root))
        except Exception:  # noqa: BLE001 - files with deliberately bad lines
            continue
    return out


def _data_files(resource_dir=None):
    files = [(p, str(p.parent)) for p in sorted(DEMO.glob("*.jsonl"))]
    if resource_dir is not None:
        files += [(p, str(resource_dir)) for p in sorted(resource_dir.glob("*.jsonl"))]
    return files


@pytest.fixture
def maybe_resource_dir():
    return RESOURCE if RESOURCE.is_dir() else None


@pytest.mark.parametrize("tok_name", ["qwen_tok", "intern_tok"])
def test_builtin_templates_take_the_fast_path(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    r = Renderer(tok, resolve_template(tok, "auto", FAMILY[tok_name]))
    assert r._fast is not None


@pytest.mark.parametrize("tok_name", ["qwen_tok", "intern_tok"])
def test_render_equals_apply_chat_template_on_all_data(tok_name, request, maybe_resource_dir):
    tok = request.getfixturevalue(tok_name)
    r = Renderer(tok, resolve_template(tok, "auto", FAMILY[tok_name]))
    n = 0
    for path, root in _data_files(maybe_resource_dir):
        for rec in _records(path, root)[::3]:
            if rec.is_pretrain:
                continue
            tools = rec.meta.get("tools")
            assert r.render(rec.messages, tools=tools) == r.reference_render(rec.messages, tools=tools), rec.source
            n += 1
    for msgs in EXTRA:
        for tools in (None, TOOLS):
            for gen in (False, True):
                assert r.render(msgs, tools, gen) == r.reference_render(msgs, tools, gen)
    assert n > 100


def test_non_json_input_falls_back_to_apply_chat_template(qwen_tok):
    class Text(str):
        pass

    r = Renderer(qwen_tok, resolve_template(qwen_tok))
    msgs = [{"role": "user", "content": Text("hi")}, {"role": "assistant", "content": "yo", "extra": (1, 2)}]
    assert r._fast(msgs, None, False) is None  # not handled by the fast path...
    assert r.render(msgs) == qwen_tok.apply_chat_template(msgs, tokenize=False)  # ...but rendered all the same


def test_template_rejecting_probes_still_renders_like_transformers(qwen_tok):
    tpl = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
           "[{{ m.role }}:{{ m.content }}]{% endfor %}{% if add_generation_prompt %}[assistant:{% endif %}")
    r = Renderer(qwen_tok, tpl)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert r.render(msgs) == qwen_tok.apply_chat_template(msgs, chat_template=tpl, tokenize=False)
    # A template's own error is the user's to fix: a DataError (exit 2) with jinja2's reason.
    with pytest.raises(DataError, match="failed at template line 1: TemplateError: no system"):
        r.render([{"role": "system", "content": "s"}] + msgs)


@pytest.mark.parametrize("tok_name", ["qwen_tok", "intern_tok"])
def test_special_ids_equal_the_vocabulary(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    st = SampleTokenizer(tok, TokenizeSettings(resolve_template(tok, "auto", FAMILY[tok_name]), 4096))
    vocab = tok.get_vocab()
    assert st.img_ids == tuple(vocab.get(t) for t in (multimodal.IMG_START, multimodal.IMG_CONTEXT, multimodal.IMG_END))


@pytest.mark.parametrize("tok_name", ["qwen_tok", "intern_tok"])
def test_demo_data_ids_equal_apply_chat_template(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    settings = TokenizeSettings(resolve_template(tok, "auto", FAMILY[tok_name]), 4096)
    for name in ("train.jsonl", "eval.jsonl"):
        out = tokenize_files(tok, settings, [str(DEMO / name)], None, num_workers=0)
        lines = [ln for ln in (DEMO / name).read_text().splitlines() if ln.strip()]
        assert out.records == len(lines) == len(out.ids)
        for i in range(0, len(lines), 7):
            ref = tok.apply_chat_template(json.loads(lines[i])["messages"], tokenize=True, return_dict=False)
            assert out.ids[i].tolist() == list(ref)


@pytest.mark.parametrize("tok_name,name", [("qwen_tok", "train.jsonl"), ("intern_tok", "vl_train.jsonl")])
def test_workers_equal_one_record_at_a_time(tok_name, name, request):
    """Batches over worker processes give what tokenising each record alone gives."""
    tok = request.getfixturevalue(tok_name)
    settings = TokenizeSettings(resolve_template(tok, "auto", FAMILY[tok_name]), 256)
    path = DEMO / name
    a = tokenize_files(tok, settings, [str(path)], None, num_workers=2, chunk_lines=300)
    st = SampleTokenizer(tok, settings)
    b = TokenizedChunk()
    for rec in _records(path, str(path.parent)):
        st.tokenize([rec], b)
    assert (a.records, a.truncated, a.dropped_no_loss, a.dropped_image_cut) == \
        (b.records, b.truncated, b.dropped_no_loss, b.dropped_image_cut)
    assert a.sources == b.sources and a.images == b.images
    assert all(x.dtype == np.int32 and np.array_equal(x, y) for x, y in zip(a.ids, b.ids))
    assert all(x.dtype == np.int32 and np.array_equal(x, y) for x, y in zip(a.labels, b.labels))


def test_chunk_pickles_flat_and_back():
    c = TokenizedChunk(records=3, sources=["a", "b", "c"], images=[[], [], []], errors=["e"])
    for n in (5, 1, 9):
        c.ids.append(np.arange(n, dtype=np.int32))
        c.labels.append(np.arange(n, dtype=np.int32) - 100)
    d = pickle.loads(pickle.dumps(c))
    assert [x.tolist() for x in d.ids] == [x.tolist() for x in c.ids]
    assert [x.tolist() for x in d.labels] == [x.tolist() for x in c.labels]
    assert all(x.dtype == np.int32 for x in d.ids + d.labels)
    assert (d.records, d.sources, d.images, d.errors) == (3, ["a", "b", "c"], [[], [], []], ["e"])
    e = pickle.loads(pickle.dumps(TokenizedChunk()))
    assert e.ids == [] and e.labels == [] and e.records == 0


def test_trained_tokens_over_mixed_items_equals_per_item_count():
    from types import SimpleNamespace

    from xtune.data.loader import _trained_tokens

    rng = np.random.default_rng(0)
    datasets = []
    for n in (7, 4):
        lengths = rng.integers(1, 9, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        labels = np.where(rng.random(offsets[-1]) < 0.5, -100, 3).astype(np.int32)
        datasets.append(SimpleNamespace(labels=labels, offsets=offsets))
    items = np.array([[0, 3], [1, 0], [0, 3], [1, 3], [0, 6], [0, 0], [1, 0]], dtype=np.int64)
    naive = sum(int((datasets[d].labels[datasets[d].offsets[i]:datasets[d].offsets[i + 1]] != -100).sum())
                for d, i in items)
    assert _trained_tokens(datasets, items) == naive
    assert _trained_tokens(datasets, np.zeros((0, 2), dtype=np.int64)) == 0


HANG = """
import os, sys
os.environ["TOKENIZERS_PARALLELISM"] = "true"
from transformers import AutoTokenizer
from xtune.data.templates import resolve_template
from xtune.data.tokenize import TokenizeSettings
from xtune.data.tokenize_files import tokenize_files
tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.backend_tokenizer.encode_batch(["warm the thread pool"] * 2000)  # the pool has run in the parent
out = tokenize_files(tok, TokenizeSettings(resolve_template(tok), 4096), [sys.argv[2]], None, num_workers=2,
                     chunk_lines=300)
print("records", out.records)
"""


def test_workers_forked_after_the_tokenizer_pool_ran_do_not_hang(tmp_path):
    """With TOKENIZERS_PARALLELISM=true set by the user, a worker forked after the parent's encode_batch used the
    Rust thread pool would wait for the pool's (absent) threads forever: the workers encode on their own thread."""
    import os
    import subprocess
    import sys

    script = tmp_path / "hang.py"
    script.write_text(HANG)
    tok = ROOT / "src" / "xtune" / "assets" / "tokenizers" / "qwen3_tiny"
    p = subprocess.Popen([sys.executable, str(script), str(tok), str(DEMO / "train.jsonl")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # the script and its hung workers
        p.communicate()
        raise AssertionError("tokenize_files hung in workers forked after the tokenizer's thread pool ran") from None
    assert p.returncode == 0, err[-2000:]
    assert "records 3600" in out
