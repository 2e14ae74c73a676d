"""Cache reuse and build lock, deterministic resumable loader, data-parallel shards, eval batches, inspect."""

import io
import math
import multiprocessing as mp
import os

import pytest
import torch
from rich.console import Console

import xtune.data.dataset as dataset_mod
from xtune.data.cache import build_or_load, save_entry
from xtune.data.dataset import load_dataset
from xtune.data.loader import build_eval_batches, build_train_loader
from xtune.data.tokenize import TokenizedChunk


def conversations(n, tag=""):
    return [{"id": i, "messages": [
        {"role": "user", "content": f"Question {tag}{i}: " + "word " * (i % 13)},
        {"role": "assistant", "content": f"Answer {i} " + "ok " * (i % 7 + 1)}]} for i in range(n)]


@pytest.fixture
def two_datasets(write_jsonl, run_spec):
    a = write_jsonl("a.jsonl", conversations(40, "a"))
    b = write_jsonl("b.jsonl", conversations(25, "b"))

    def make(**kw):
        train = dict(dict(global_batch_size=4, micro_batch_size=1, seed=3), **kw.pop("train", {}))
        kw.setdefault("pack_max_length", 96)
        kw.setdefault("sample_max_length", 96)
        return run_spec([("a", a), ("b", b, {"sample_ratio": 0.6})], eval_datasets=[("b", b)], train=train, **kw)

    return make


def same(b1, b2):
    return all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
               and torch.equal(x.cu_seqlens, y.cu_seqlens) for x, y in zip(b1, b2)) and len(b1) == len(b2)


def test_second_start_reads_the_cache(qwen_tok, two_datasets, monkeypatch):
    spec = two_datasets()
    first = load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model)
    assert first.built

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised although cached")

    monkeypatch.setattr(dataset_mod, "tokenize_files", no_tokenising)
    again = load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model)
    assert not again.built and (again.ids == first.ids).all() and again.sources == first.sources
    # a different length setting is a different cache entry
    with pytest.raises(AssertionError, match="tokenised although cached"):
        longer = two_datasets(sample_max_length=95)
        load_dataset(longer.data.datasets[0], qwen_tok, longer.data, longer.model)


def test_cache_key_follows_file_content(qwen_tok, write_jsonl, run_spec):
    path = write_jsonl("c.jsonl", conversations(3))
    spec = run_spec([("c", path)])
    assert load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model).built
    write_jsonl("c.jsonl", conversations(4))
    ds = load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model)
    assert ds.built and len(ds) == 4


def _race(folder, out):
    def build():
        import time

        time.sleep(0.3)  # long enough for the others to find the lock taken
        save_entry(folder, TokenizedChunk(), {"name": "x"})

    out.put(build_or_load(folder, build, poll_s=0.05))


def test_one_process_builds_the_others_wait(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "entry", q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    built = sorted(q.get(timeout=5) for _ in procs)
    assert built == [False, False, True]
    assert (tmp_path / "entry" / "meta.json").exists() and not (tmp_path / "entry.lock").exists()


def _die_while_building(folder, started):
    def build():
        started.set()
        os._exit(9)  # killed in the middle of the build: no cleanup runs

    build_or_load(folder, build)


def test_a_killed_builder_does_not_block_the_others(tmp_path):
    ctx = mp.get_context("fork")
    started = ctx.Event()
    p = ctx.Process(target=_die_while_building, args=(tmp_path / "entry", started))
    p.start()
    assert started.wait(30)
    p.join(30)
    assert p.exitcode == 9
    built = build_or_load(tmp_path / "entry", lambda: save_entry(tmp_path / "entry", TokenizedChunk(), {"name": "x"}),
                          poll_s=0.05, timeout_s=10)  # the dead builder's lock is free at once
    assert built and (tmp_path / "entry" / "meta.json").exists()


def test_loader_is_deterministic_and_resumes_exactly(qwen_tok, two_datasets):
    spec = two_datasets(train=dict(epochs=2.5))
    full = build_train_loader(spec, qwen_tok)
    all_steps = list(full)
    assert len(all_steps) == full.total_steps == math.ceil(2.5 * full.steps_per_epoch)
    assert all(len(s) == 4 for s in all_steps)  # grad accumulation = 4 / (1 x 1)

    k = 5
    part = build_train_loader(spec, qwen_tok)
    for _ in range(k):
        next(part)
    state = part.state_dict()
    resumed = build_train_loader(spec, qwen_tok)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(all_steps) - k
    assert all(same(a, b) for a, b in zip(rest, all_steps[k:]))
    # rows are reshuffled per epoch
    spe = full.steps_per_epoch
    assert full.step_rows(0) != full.step_rows(spe)
    # a different seed changes the data order
    other = build_train_loader(two_datasets(train=dict(seed=4)), qwen_tok)
    with pytest.raises(Exception, match="differs from the checkpoint"):
        other.load_state_dict(state)


def test_epoch_covers_every_row_and_max_steps(qwen_tok, two_datasets):
    loader = build_train_loader(two_datasets(train=dict(max_steps=3)), qwen_tok)
    assert loader.total_steps == 3 and len(list(loader)) == 3
    rows = [r for s in range(loader.steps_per_epoch) for mb in loader.step_rows(s) for r in mb]
    assert set(rows) == set(range(len(loader.data.rows)))
    s = loader.stats
    assert 0.5 < s.packing_efficiency <= 1 and s.samples == 40 + 15


def test_ranks_split_the_global_batch(qwen_tok, two_datasets):
    spec = two_datasets(train=dict(global_batch_size=8, micro_batch_size=2))
    single = build_train_loader(spec, qwen_tok, dp_rank=0, dp_size=1)
    ranks = [build_train_loader(spec, qwen_tok, dp_rank=r, dp_size=2) for r in range(2)]
    assert single.grad_accum == 4 and all(r.grad_accum == 2 for r in ranks)
    for step in range(3):
        whole = [r for mb in single.step_rows(step) for r in mb]
        split = [r for ld in ranks for mb in ld.step_rows(step) for r in mb]
        assert whole == split
        batches = [next(ld) for ld in ranks]
        assert [len(b) for b in batches] == [2, 2]
        assert all(mb.input_ids.shape == (1, 2 * 96) for b in batches for mb in b)


def test_eval_batches_same_count_on_every_rank(qwen_tok, two_datasets):
    spec = two_datasets(train=dict(micro_batch_size=2))
    per_rank = [build_eval_batches(spec, qwen_tok, dp_rank=r, dp_size=3) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    trained = sum(mb.num_trained for b in per_rank for mb in b)
    ds = load_dataset(spec.data.eval_datasets[0], qwen_tok, spec.data, spec.model)
    assert trained == ds.num_trained  # every eval sample once, ratio-independent order
    pads = [mb for b in per_rank for mb in b if mb.num_trained == 0]
    assert all(mb.doc_trained_tokens.sum() == 0 for mb in pads)


def test_multimodal_batch_has_matching_pixels(intern_tok, resource_dir, run_spec):
    spec = run_spec(
        [("multi", resource_dir / "mllm_sft_multi_image_example_data.jsonl", {"media_root": str(resource_dir.parent)})],
        model=dict(family="intern_s1", image_size=28, tokens_per_tile=4, max_tiles=4),
        train=dict(global_batch_size=2, micro_batch_size=1), pack_max_length=512, sample_max_length=512,
    )
    loader = build_train_loader(spec, intern_tok)
    ctx = intern_tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    for mb in next(loader):
        n_ctx = int((mb.input_ids == ctx).sum())
        assert mb.pixel_values is not None and mb.pixel_values.shape[1:] == (3, 28, 28)
        assert n_ctx == mb.pixel_values.shape[0] * 4


def test_inspect_prints_counts_efficiency_and_sample(qwen_tok, write_jsonl, run_spec):
    """Every number printed is checked against counts made here with plain apply_chat_template."""
    import re

    import numpy as np

    from xtune.data.inspect import inspect_data

    records = {"a": conversations(40, "a"), "b": conversations(25, "b")}
    paths = {name: write_jsonl(f"{name}.jsonl", recs) for name, recs in records.items()}
    spec = run_spec([("a", paths["a"]), ("b", paths["b"], {"sample_ratio": 2.0})],
                    train=dict(global_batch_size=4, micro_batch_size=1, seed=3), pack_max_length=96, sample_max_length=96)
    buf = io.StringIO()
    inspect_data(spec, qwen_tok, Console(file=buf, width=120, force_terminal=False))
    out = buf.getvalue()

    def render(msgs, **kw):
        return qwen_tok.apply_chat_template(msgs, tokenize=True, return_dict=False, **kw)

    lengths, trained = {}, {}
    for name, recs in records.items():
        lengths[name] = [len(render(r["messages"])) for r in recs]
        # trained: the last assistant turn after its generation prompt, without the newline after <|im_end|>
        trained[name] = sum(len(render(r["messages"])) - len(render(r["messages"][:-1], add_generation_prompt=True)) - 1
                            for r in recs)
        n = len(recs)
        row = (rf"│ {name}\s+│\s+messages \(auto\) │\s+{n} │"
               rf"\s+{n} │\s+{sum(lengths[name])} │\s+{trained[name]} │\s+0 │\s+0 │\s+0 │")
        assert re.search(row, out), (row, out)
        section = out.split(f"{name} sample lengths (tokens):\n")[1]
        printed = [int(line.split()[-1]) for line in section.splitlines()[:10]]
        assert printed == np.histogram(lengths[name], bins=10)[0].tolist()
    m = re.search(r"(\d+) samples -> (\d+) rows of 96 tokens, efficiency ([\d.]+)%", out)
    assert m, out
    samples, rows, eff = int(m[1]), int(m[2]), m[3]
    real = sum(lengths["a"]) + 2 * sum(lengths["b"])  # b is seen twice (sample_ratio 2)
    assert samples == 40 + 2 * 25 and rows * 96 >= real and eff == f"{100 * real / (rows * 96):.1f}"
    m = re.search(r"sample \S+/(\w)\.jsonl:(\d+) \((\d+) tokens, 0 image\(s\)\)", out)
    assert m, out
    name, line = m[1], int(m[2])
    assert int(m[3]) == lengths[name][line - 1]
    assert records[name][line - 1]["messages"][1]["content"].strip() in out.split(m[0])[1]


def test_render_sample_marks_trained_and_image_tokens(intern_tok):
    from xtune.data.inspect import render_sample

    ids = intern_tok("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>Hi<|im_end|>", add_special_tokens=False)["input_ids"]
    ids += intern_tok("ok<|im_end|>", add_special_tokens=False)["input_ids"]
    n_ok = len(intern_tok("ok<|im_end|>", add_special_tokens=False)["input_ids"])
    labels = [-100] * (len(ids) - n_ok - 1) + ids[-n_ok:] + [-100]
    text = render_sample(intern_tok, ids, labels)
    assert "<IMG_CONTEXT>x2" in text.plain
    green = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == "bold green")
    assert green == "ok<|im_end|>"


@pytest.mark.parametrize("reduction", ["sample", "square"])
def test_hard_packing_weighs_a_cut_document_by_its_whole_count(qwen_tok, two_datasets, reduction):
    """Through the real loader: rows of 24 tokens cut most samples into pieces; over one epoch (every row
    once) each sample's token weights must add up to what its whole trained-token count gives."""
    from collections import Counter, defaultdict

    from xtune.methods.sft_objective import token_weights

    spec = two_datasets(pack="hard", pack_max_length=24, train=dict(global_batch_size=1))
    loader = build_train_loader(spec, qwen_tok)
    data = loader.data
    pieces = Counter(i for row in data.rows for i, _, _ in row)
    assert sum(n > 1 for n in pieces.values()) > 10  # many samples are cut: the test can fail
    # Independent count: each mixed sample's trained tokens straight from the tokenized arrays.
    expected = {}
    for k, (d, i) in enumerate(data.items):
        ds = data.datasets[d]
        n = int((ds.labels[ds.offsets[i]:ds.offsets[i + 1]] != -100).sum())
        if n:
            expected[k] = 1.0 if reduction == "sample" else math.sqrt(n)
    got = defaultdict(float)
    for step in range(loader.steps_per_epoch):
        (rows,), (mb,) = loader.step_rows(step), next(loader)
        w = token_weights(mb, reduction)
        pos = 0
        for i, s, e in data.rows[rows[0]]:  # pieces in collate order; padding comes last
            got[i] += float(w[pos:pos + e - s].sum())
            pos += e - s
    got = {k: v for k, v in got.items() if v}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(expected[k], rel=1e-5) for k in expected)


def test_hard_packing_cuts_samples_longer_than_a_row_into_rows(qwen_tok, two_datasets):
    """data.sample_max_length > data.pack_max_length is allowed with hard packing (config/validate.length_problems):
    through the real loader every sample keeps its tokens up to sample_max_length (none is cut at the row length)
    and is laid over consecutive rows, each piece continuing where the last ended."""
    spec = two_datasets(pack="hard", pack_max_length=16, sample_max_length=96, train=dict(global_batch_size=1))
    data = build_train_loader(spec, qwen_tok).data
    assert all(ds.truncated == 0 for ds in data.datasets)
    pieces = {}
    for row in data.rows:
        assert sum(e - s for _, s, e in row) <= 16
        for i, s, e in row:
            pieces.setdefault(i, []).append((s, e))
    lengths = [data.item_length(d, i) for d, i in data.items]
    assert max(lengths) > 2 * 16  # samples longer than two rows: the test can fail
    for k, n in enumerate(lengths):
        spans = pieces[k]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
