"""Data preparation with a Python ("slow") tokenizer: the path Intern-S1's own tokenizer takes.

Tokenizer: the remote-code fixture the tests build (tests/s1_fixture.py: byte-level BPE from
vocab.json + merges.txt in Python, a sentencepiece SMILES sub-tokenizer, no tokenizer.json), loaded
with trust_remote_code. Texts: the bundled demo chats (repeated) plus chats with SMILES spans.
- xtune slow path: `tokenize_files` (parse, render the template, encode, labels) in 1 and 2 processes.
- raw: `tokenizer.encode` of the already rendered texts, one process (rendering not timed).
- fast path, for scale: the same chats with the shipped tokenizers-backed tiny Intern-S1 tokenizer.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, run_worker, worker_args  # noqa: E402

SMILES = ("CCO", "C1=CC=CC=C1", "CC(=O)OC1=CC=CC=C1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C")


def work(a: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from tests.s1_fixture import TINY, build_s1_tokenizer
    from xtune.data.templates import resolve_template
    from xtune.data.tokenize import TokenizeSettings
    from xtune.data.tokenize_files import tokenize_files

    lines = (ROOT / "src" / "xtune" / "assets" / "demo" / "train.jsonl").read_text().splitlines()[: a["records"]]
    lines += [json.dumps({"messages": [{"role": "user", "content": f"Describe <SMILES>{s}</SMILES>."},
                                       {"role": "assistant", "content": f"<SMILES>{s}</SMILES> is a molecule."}]})
              for s in SMILES * 25]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        slow = AutoTokenizer.from_pretrained(build_s1_tokenizer(Path(tmp) / "tok"), trust_remote_code=True)
        fast = AutoTokenizer.from_pretrained(str(TINY))
        data = Path(tmp) / "chats.jsonl"
        data.write_text("".join(ln + "\n" for ln in lines))
        for name, tok, workers in (("slow_1", slow, 1), ("slow_2", slow, 2), ("fast_1", fast, 1)):
            settings = TokenizeSettings(resolve_template(tok, "auto", "intern_s1"), 8192)
            slow.cache.clear()  # the BPE word cache: every run starts cold
            t = time.perf_counter()
            chunk = tokenize_files(tok, settings, [str(data)], None, num_workers=workers)
            out[name + "_s"] = time.perf_counter() - t
            out["tokens"] = sum(len(x) for x in chunk.ids)
        texts = [slow.apply_chat_template(json.loads(ln)["messages"], tokenize=False) for ln in lines]
        slow.cache.clear()
        t = time.perf_counter()
        raw_tokens = sum(len(slow.encode(x, add_special_tokens=False)) for x in texts)
        out.update(raw_s=time.perf_counter() - t, raw_tokens=raw_tokens, records=len(lines))
    return out


def run(quick: bool, log=print) -> dict:
    r = run_worker("bench_slowtok.py", dict(records=300 if quick else 3600), 1800)
    if "error" in r:
        log(f"slowtok: {r['error']}")
        return dict(error=r["error"])
    res = dict(r, raw_tok_s=r["raw_tokens"] / r["raw_s"],
               **{f"{k}_tok_s": r["tokens"] / r[f"{k}_s"] for k in ("slow_1", "slow_2", "fast_1")})
    log(f"slowtok: {r['tokens']} tokens: xtune slow path {res['slow_1_tok_s']:.0f} tok/s (1 process), "
        f"{res['slow_2_tok_s']:.0f} (2), raw slow encode {res['raw_tok_s']:.0f}, fast path {res['fast_1_tok_s']:.0f}")
    return res


if __name__ == "__main__":
    emit(work(worker_args()))
