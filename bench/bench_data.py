"""Data preparation speed: xtune's data stage against the raw tokenizer on the same texts, and the options
for rendering chat templates.

Texts: the bundled demo chats, repeated (8x; 2x with --quick) into one JSONL file, Qwen3 tokenizer.
- xtune cold: `PackedData` (what the training loader builds) on an empty cache_dir: read and parse
  the JSONL, render the chat template, tokenise, build assistant-only labels, write the cache,
  mix, pack (soft, 4096-token rows); `data.num_workers` = 2 processes. Once per rendering option:
  `fast` (xtune's: `data/fast_render.py`; `fast_1proc` the same in one process), `sandbox` (the template
  compiled once in transformers' own environment, jinja2's `ImmutableSandboxedEnvironment`, no
  short-cuts), `apply` (`apply_chat_template` per record); the median of `rounds` runs each, the options interleaved.
- xtune warm: the same with the cache filled (read the cache, mix, pack).
- raw: `tokenizer.backend_tokenizer.encode_batch` (Rust, all cores) on the already rendered
  chat-template strings of the same records; rendering is not timed.
- render: CPU microseconds per chat of each way to render (one process, the best of `rounds`), with the
  encoding and the labels for scale: on short chats rendering costs about as much as encoding.
Ratios are tokens/s against raw's; `cpu_ratio` uses CPU seconds (all processes), which a loaded machine
disturbs less than wall time. Runs in a fresh process (the tokenizer's thread pool and xtune's forked
workers do not mix).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, run_worker, worker_args  # noqa: E402

OPTIONS = ("fast", "fast_1proc", "sandbox", "apply")  # fast_1proc: num_workers=0, the others 2 processes


def _cpu() -> float:
    """CPU seconds of this process and its finished children (xtune's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _use(option: str):
    """Make the data stage render with `option` (the bench measures alternatives; xtune itself runs `fast`)."""
    from transformers.utils import chat_template_utils as ctu

    from xtune.data import fast_render, templates, tokenize

    tokenize._CACHED.clear()  # the SampleTokenizer (and its Renderer) of the previous option
    templates.fast_renderer = (lambda tok, tpl: None) if option == "apply" else fast_render.fast_renderer
    fast_render.compile_template = ctu._compile_jinja_template if option == "sandbox" else _use.compile
    return option


def _render_us(tok, chats, rounds: int) -> dict:
    """CPU us per chat of each way to render the chats, and of encoding them and placing the labels."""
    from transformers.utils import chat_template_utils as ctu

    from xtune.data import fast_render
    from xtune.data.templates import resolve_template

    tpl = resolve_template(tok)
    kwargs = dict(tok.special_tokens_map)
    stock, fast = ctu._compile_jinja_template(tpl), _use.compile(tpl)

    def clean(chat):  # apply_chat_template's preprocessing of plain JSON messages
        return ctu._alias_reasoning_fields([{k: v for k, v in m.items() if v is not None} for m in chat])

    texts = tok.apply_chat_template(chats, tokenize=False)
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    spans = [[(len(t) // 2, len(t))] for t in texts]
    fns = {
        "apply_chat_template per chat": lambda: [tok.apply_chat_template(c, tokenize=False) for c in chats],
        "apply_chat_template, all chats in one call": lambda: tok.apply_chat_template(chats, tokenize=False),
        "jinja2 sandbox, compiled once": lambda: [stock.render(messages=clean(c), tools=None, documents=None,
                                                               add_generation_prompt=False, **kwargs) for c in chats],
        "xtune fast sandbox, compiled once": lambda: [fast.render(messages=clean(c), tools=None, documents=None,
                                                                  add_generation_prompt=False, **kwargs)
                                                      for c in chats],
        "encode_batch, 1 thread (for scale)": lambda: tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False),
        "labels from character offsets (for scale)": lambda: [_labels(e, sp) for e, sp in zip(enc, spans)],
    }
    assert fns["xtune fast sandbox, compiled once"]() == fns["jinja2 sandbox, compiled once"]() == texts
    assert fast_render.versions_supported()
    best = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            best[name] = min(best.get(name, float("inf")), time.process_time() - t)
    return {name: 1e6 * v / len(chats) for name, v in best.items()}


def _labels(enc, spans):
    from bisect import bisect_left

    import numpy as np

    trained = np.zeros(len(enc.ids), dtype=bool)
    starts = [o[0] for o in enc.offsets]
    for a, b in spans:
        trained[bisect_left(starts, a):bisect_left(starts, b)] = True
    return trained


def work(a: dict) -> dict:
    from transformers import AutoTokenizer

    from xtune.config.compose import load_spec
    from xtune.data import fast_render
    from xtune.data.loader import PackedData

    _use.compile = fast_render.compile_template
    # The tokenizer's thread pool only for the raw baseline, at the end: xtune's workers are forked, and a child
    # forked after the pool has run waits for the pool's threads forever (`fast_1proc` encodes in this process).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = AutoTokenizer.from_pretrained(a["tok_dir"])
    rounds = a.get("rounds", 3)
    lines = (ROOT / "src" / "xtune" / "assets" / "demo" / "train.jsonl").read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        data.write_text("".join(ln + "\n" for _ in range(a["repeat"]) for ln in lines))
        chats = [json.loads(ln)["messages"] for ln in data.read_text().splitlines()]
        texts = tok.apply_chat_template(chats, tokenize=False)
        wall, cpu, n = {o: [] for o in OPTIONS}, {o: [] for o in OPTIONS}, 0
        for r in range(rounds):
            for option in OPTIONS:
                _use(option)
                workers = 0 if option == "fast_1proc" else 2
                _, spec = load_spec(["recipe=demo", f"model.tokenizer={a['tok_dir']}", f"data.datasets.0.path={data}",
                                     f"data.cache_dir={Path(tmp) / f'cache_{option}_{r}'}", f"data.num_workers={workers}",
                                     "data.sample_max_length=4096", "data.pack_max_length=4096", "data.pack=soft"])
                c, t = _cpu(), time.perf_counter()
                packed = PackedData(spec.data.datasets, spec, tok, shuffle=True, verbose=False)
                wall[option].append(time.perf_counter() - t)
                cpu[option].append(_cpu() - c)
                assert packed.datasets[0].built and n in (0, packed.stats.real_tokens)
                n = packed.stats.real_tokens
        _use("fast")
        t = time.perf_counter()
        packed = PackedData(spec.data.datasets, spec, tok, shuffle=True, verbose=False)  # the last cache, warm
        warm = time.perf_counter() - t
        assert not packed.datasets[0].built
        render = _render_us(tok, chats, rounds)
    raw, raw_cpu = [], []
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    for _ in range(max(3, rounds)):
        c, t = _cpu(), time.perf_counter()
        enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        raw.append(time.perf_counter() - t)
        raw_cpu.append(_cpu() - c)
    raw_tokens = sum(len(e.ids) for e in enc)
    med = statistics.median
    return dict(records=len(texts), tokens=n, raw_tokens=raw_tokens, cold_s=med(wall["fast"]), warm_s=warm,
                raw_s=min(raw), raw_cpu_s=min(raw_cpu), render_us=render,
                options={o: dict(wall_s=med(wall[o]), cpu_s=med(cpu[o]), walls=wall[o]) for o in OPTIONS})


def run(quick: bool, log=print) -> dict:
    from qwen_tok import qwen3_tokenizer_dir

    r = run_worker("bench_data.py", dict(tok_dir=str(qwen3_tokenizer_dir()), repeat=2 if quick else 8,
                                         rounds=2 if quick else 3), 1800)
    if "error" in r:
        log(f"data: {r['error']}")
        return dict(error=r["error"], meets=False)
    raw = r["raw_tokens"] / r["raw_s"]
    raw_cpu = r["raw_tokens"] / r["raw_cpu_s"]
    for o in r["options"].values():
        o.update(tok_s=r["tokens"] / o["wall_s"], ratio=r["tokens"] / o["wall_s"] / raw,
                 cpu_ratio=r["tokens"] / o["cpu_s"] / raw_cpu)
    res = dict(r, cold_tok_s=r["tokens"] / r["cold_s"], warm_tok_s=r["tokens"] / r["warm_s"], raw_tok_s=raw)
    res.update(cold_ratio=res["cold_tok_s"] / raw, warm_ratio=res["warm_tok_s"] / raw,
               cold_cpu_ratio=r["options"]["fast"]["cpu_ratio"],
               target=dict(cold_ratio_min=0.7), meets=res["cold_tok_s"] / raw >= 0.7)
    log(f"data: {r['tokens']} tokens: xtune cold {res['cold_tok_s']:.0f} tok/s, warm {res['warm_tok_s']:.0f}, "
        f"raw encode_batch {raw:.0f}: cold-prep ratio {res['cold_ratio']:.2f}x (CPU time {res['cold_cpu_ratio']:.2f}x); "
        + ", ".join(f"{k} {o['ratio']:.2f}x" for k, o in r["options"].items()))
    return res


if __name__ == "__main__":
    emit(work(worker_args()))
