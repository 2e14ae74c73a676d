"""Packing efficiency (real tokens / row tokens) of each strategy: `xtune.data.pack.pack` + `efficiency`.

Two length distributions: the bundled demo chats tokenised with the real Qwen3 tokenizer by xtune's
data stage, and a long-tailed log-normal one (median 500 tokens, sigma 1, clipped to [16, 2048]).
Rows of 2048 and 4096 tokens; soft uses the default look-ahead of 256.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE  # noqa: E402

STRATEGIES = ("soft", "bfd", "hard", "none")
CAPS = (2048, 4096)


def demo_lengths() -> list:
    from qwen_tok import qwen3_tokenizer_dir
    from transformers import AutoTokenizer

    from xtune.config.compose import load_spec
    from xtune.data.dataset import load_dataset

    tok_dir = qwen3_tokenizer_dir()
    _, spec = load_spec(["recipe=demo", f"model.tokenizer={tok_dir}", f"data.cache_dir={CACHE / 'data'}",
                         "data.sample_max_length=2048", "data.pack_max_length=2048"])
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ds = load_dataset(spec.data.datasets[0], tok, spec.data, spec.model, verbose=False)
    return [int(x) for x in ds.lengths]


def lognormal_lengths(n: int, seed: int = 0) -> list:
    import numpy as np

    x = np.random.default_rng(seed).lognormal(mean=np.log(500), sigma=1.0, size=n)
    return [int(v) for v in np.clip(np.round(x), 16, 2048)]


def run(quick: bool, log=print) -> dict:
    from xtune.data.pack import efficiency, pack

    sets = {"demo (Qwen3 tokens)": demo_lengths(), "log-normal": lognormal_lengths(2000 if quick else 20000)}
    out = {}
    for name, lengths in sets.items():
        res = {}
        for cap in CAPS:
            for s in STRATEGIES:
                t = time.perf_counter()
                rows = pack(s, lengths, cap)
                dt = time.perf_counter() - t
                res[f"{s}@{cap}"] = dict(efficiency=efficiency(rows, cap), rows=len(rows), pack_s=dt)
        out[name] = dict(samples=len(lengths), tokens=sum(lengths), mean_len=sum(lengths) / len(lengths),
                         max_len=max(lengths), strategies=res)
        log(f"pack: {name}: " + ", ".join(f"{k} {v['efficiency']:.3f}" for k, v in res.items()))
    return dict(datasets=out, strategies=list(STRATEGIES), caps=list(CAPS))
