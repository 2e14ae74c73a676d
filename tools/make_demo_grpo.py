#!/usr/bin/env python
"""Generate xtune's bundled prompts for `xtune grpo recipe=demo_grpo` (deterministic; committed).

    python tools/make_demo_grpo.py                 # rewrites src/xtune/assets/demo/grpo_{train,eval}.jsonl
    python tools/make_demo_grpo.py --out /tmp/demo # anywhere else

Each record asks one of the SFT demo's small sums or differences (the same phrasings as make_demo_data.py) and
keeps its number in `answer`, which the demo's verifiable reward (regex) compares with the last number of
a completion. Half the records give the prompt as a string, half as a message list. Everything comes from
`random.Random(SEED)`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "xtune" / "assets" / "demo"
SEED = 20260127
N_TRAIN = 400
N_EVAL = 40


def _task(r: random.Random):
    a, b = r.randint(1, 50), r.randint(1, 50)
    kind = r.randrange(4)
    if kind == 0:
        return f"What is {a} + {b}?", a + b
    if kind == 1:
        return f"Add {a} and {b}.", a + b
    hi, lo = max(a, b), min(a, b)
    if kind == 2:
        return f"What is {hi} - {lo}?", hi - lo
    return f"Subtract {lo} from {hi}.", hi - lo


def records(n: int, r: random.Random, prefix: str):
    for i in range(n):
        question, answer = _task(r)
        prompt = question if i % 2 else [{"role": "user", "content": question}]
        yield {"id": f"{prefix}-{i:05d}", "prompt": prompt, "answer": str(answer)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    r = random.Random(SEED)
    for name, n in (("grpo_train", N_TRAIN), ("grpo_eval", N_EVAL)):
        with open(out / f"{name}.jsonl", "w") as f:
            for rec in records(n, r, f"demo-{name.replace('_', '-')}"):
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {out / name}.jsonl ({n} records)")


if __name__ == "__main__":
    main()
