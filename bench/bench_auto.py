"""The generic `auto` family vs the tuned qwen3 family on the same Qwen3 (bench_train's model, data and
settings): xtune's engine runs each in its own process from the same saved init. The losses must be
equal (same maths through transformers' Auto classes) and auto's trained tokens/s within 10%.
Runs alternate (qwen3, auto, qwen3, auto) so a busy machine slows both alike."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ROW, prepare, summarise  # noqa: E402
from common import run_worker  # noqa: E402


def run(quick: bool, log=print) -> dict:
    warmup, timed, rounds = (1, 2, 1) if quick else (1, 5, 2)
    prep = prepare(quick)
    base = dict(prep, steps=warmup + timed, warmup=warmup, system="xtune")
    runs = {"qwen3": [], "auto": []}
    for _ in range(rounds):
        for family in runs:
            t = time.perf_counter()
            r = summarise(run_worker("bench_train.py", dict(base, family=family), timeout=1800))
            runs[family].append(r)
            log(f"auto: family={family} done in {time.perf_counter() - t:.0f}s: "
                + (r.get("error") or f"{r['trained_tok_s']:.0f} trained tok/s, loss {r['loss_first']:.4f}"))
    errors = {f: r["error"] for f, rs in runs.items() for r in rs if "error" in r}
    if errors:
        return dict(error="; ".join(f"{f}: {e}" for f, e in errors.items()))
    systems = {}
    for family, rs in runs.items():
        steps = [t for r in rs for t in r["step_times"]]
        tok_s = sum(r["trained_tok_s"] for r in rs) / len(rs)
        systems[family] = dict(trained_tok_s=tok_s, step_s=sum(steps) / len(steps), losses=rs[0]["losses"],
                               runs_tok_s=[r["trained_tok_s"] for r in rs])
    loss_diff = max(abs(a - b) for a, b in zip(systems["auto"]["losses"], systems["qwen3"]["losses"], strict=True))
    ratio = systems["auto"]["trained_tok_s"] / systems["qwen3"]["trained_tok_s"]
    return dict(config=dict(row=ROW, warmup_steps=warmup, timed_steps=timed, rounds=rounds),
                systems=systems, speed_ratio=ratio, loss_max_abs_diff=loss_diff,
                target=dict(speed_ratio_min=0.9, loss_max_abs_diff=0.0),
                meets=ratio >= 0.9 and loss_diff == 0.0)
