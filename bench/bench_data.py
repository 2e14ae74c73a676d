"""Data preparation speed: xtune's data stage against the raw tokenizer on the same texts.

Texts: the bundled demo chats, repeated (8x; 2x with --quick) into one JSONL file, Qwen3 tokenizer.
- xtune cold: `PackedData` (what the training loader builds) on an empty cache_dir: read and parse
  the JSONL, render the chat template, tokenise, build assistant-only labels, write the cache,
  mix, pack (soft, 4096-token rows); `data.num_workers` = 2 processes.
- xtune warm: the same with the cache filled (read the cache, mix, pack).
- raw: `tokenizer.backend_tokenizer.encode_batch` (Rust, all cores) on the already rendered
  chat-template strings of the same records; rendering is not timed.
Runs in a fresh process (the tokenizer's thread pool and xtune's forked workers do not mix).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, run_worker, worker_args  # noqa: E402


def work(a: dict) -> dict:
    from transformers import AutoTokenizer

    from xtune.config.compose import load_spec
    from xtune.data.loader import PackedData

    tok = AutoTokenizer.from_pretrained(a["tok_dir"])
    lines = (ROOT / "src" / "xtune" / "assets" / "demo" / "train.jsonl").read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        data.write_text("".join(ln + "\n" for _ in range(a["repeat"]) for ln in lines))
        _, spec = load_spec(["recipe=demo", f"model.tokenizer={a['tok_dir']}", f"data.datasets.0.path={data}",
                             f"data.cache_dir={Path(tmp) / 'cache'}", "data.num_workers=2",
                             "data.sample_max_length=4096", "data.pack_max_length=4096", "data.pack=soft"])
        times = {}
        for kind in ("cold", "warm"):
            t = time.perf_counter()
            packed = PackedData(spec.data.datasets, spec, tok, shuffle=True, verbose=False)
            times[kind] = time.perf_counter() - t
            assert packed.datasets[0].built == (kind == "cold")
        tokens = packed.stats.real_tokens
        texts = [tok.apply_chat_template(json.loads(ln)["messages"], tokenize=False)
                 for ln in data.read_text().splitlines()]
    raw = []
    for _ in range(2):
        t = time.perf_counter()
        enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        raw.append(time.perf_counter() - t)
    raw_tokens = sum(len(e.ids) for e in enc)
    return dict(records=len(texts), tokens=tokens, raw_tokens=raw_tokens, cold_s=times["cold"],
                warm_s=times["warm"], raw_s=min(raw))


def run(quick: bool, log=print) -> dict:
    from qwen_tok import qwen3_tokenizer_dir

    r = run_worker("bench_data.py", dict(tok_dir=str(qwen3_tokenizer_dir()), repeat=2 if quick else 8), 900)
    if "error" in r:
        log(f"data: {r['error']}")
        return dict(error=r["error"], meets=False)
    raw = r["raw_tokens"] / r["raw_s"]
    res = dict(r, cold_tok_s=r["tokens"] / r["cold_s"], warm_tok_s=r["tokens"] / r["warm_s"], raw_tok_s=raw)
    res.update(cold_ratio=res["cold_tok_s"] / raw, warm_ratio=res["warm_tok_s"] / raw,
               target=dict(cold_ratio_min=0.7), meets=res["cold_tok_s"] / raw >= 0.7)
    log(f"data: {r['tokens']} tokens: xtune cold {res['cold_tok_s']:.0f} tok/s, "
        f"warm {res['warm_tok_s']:.0f}, raw encode_batch {raw:.0f} ({res['cold_ratio']:.2f}x cold)")
    return res


if __name__ == "__main__":
    emit(work(worker_args()))
