"""`parallel.compile` on and off: xtune's engine on the block-heavy `blocks` shape (bench_lora.BLOCKS: hidden 512,
8 layers, vocab 4,096, the tiny tokenizer, 2048-token soft-packed rows of the demo chats, fp32 on CPU, chunked CE,
per-document sdpa). Each system runs in its own process from the same saved init.

Compile time is reported apart from step time: the first step of the compiled run (inductor builds the block's
forward and backward kernels with the system C++ compiler) minus the eager run's first step. Steady state: the
mean step time after `warmup` steps. Losses of both runs are printed (they must agree to fp32 rounding).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import BLOCKS, TINY_TOK  # noqa: E402
from bench_train import prepare  # noqa: E402
from common import run_worker  # noqa: E402

SYSTEMS = {"eager": [], "compiled": ["parallel.compile=true"],
           "eager_ac": ["parallel.activation_checkpointing=true"],
           "compiled_ac": ["parallel.compile=true", "parallel.activation_checkpointing=true"]}


def run(quick: bool, log=print) -> dict:
    prep = prepare(quick, tok_dir=TINY_TOK, arch=BLOCKS)
    warmup, steps = (1, 3) if quick else (2, 8)
    out = {}
    for name, overrides in SYSTEMS.items():
        r = run_worker("bench_train.py", dict(prep, system="xtune", steps=steps, warmup=0, overrides=overrides), 1800)
        if "error" not in r:
            timed = r["step_s"][warmup:]
            r.update(first_step_s=r["step_s"][0], step_mean_s=sum(timed) / len(timed))
        out[name] = r
        log(f"compile: {name}: " + (r.get("error") or f"first step {r['first_step_s']:.1f} s, then "
                                    f"{r['step_mean_s']:.2f} s/step, losses {[round(x, 4) for x in r['losses'][:3]]}"))
    ratios = {}
    for base in ("eager", "eager_ac"):
        comp = base.replace("eager", "compiled")
        if "step_mean_s" in out.get(base, {}) and "step_mean_s" in out.get(comp, {}):
            ratios[comp] = dict(speedup=out[base]["step_mean_s"] / out[comp]["step_mean_s"],
                                compile_s=out[comp]["first_step_s"] - out[base]["first_step_s"],
                                max_loss_rel_diff=max(abs(a - b) / abs(a) for a, b in
                                                      zip(out[base]["losses"], out[comp]["losses"])))
    return dict(config=dict(arch=BLOCKS, warmup=warmup, steps=steps), systems=out, ratios=ratios)
