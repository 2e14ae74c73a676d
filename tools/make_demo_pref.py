#!/usr/bin/env python
"""Generate xtune's bundled preference pairs for `xtune dpo recipe=demo_dpo` (deterministic; committed).

    python tools/make_demo_pref.py                 # rewrites src/xtune/assets/demo/pref_{train,eval}.jsonl
    python tools/make_demo_pref.py --out /tmp/demo # anywhere else

Each pair asks one of the demo's short tasks; the chosen answer is right, the rejected one is wrong in a
way a tiny model can learn to tell apart: a wrong fact (capitals, fruit colours), a wrong sum, words left
not capitalised, or an unhelpful refusal. Both of TRL's conversational forms appear: explicit
prompt (`prompt`, `chosen`, `rejected`) and implicit prompt (two full conversations sharing their start),
some with a system prompt. Everything comes from `random.Random(SEED)`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_demo_data import CAPITALS, DEFAULT_OUT, FRUITS, WORDS

SEED = 20250101
N_TRAIN = 320
N_EVAL = 48
REFUSALS = ("I cannot help with that.", "I don't know.", "Sorry, I am not able to answer.")
SYSTEMS = (None, None, "You are a helpful assistant.")


def _capital(r):
    country, city = r.choice(CAPITALS)
    wrong = r.choice([c for _, c in CAPITALS if c != city])
    return f"What is the capital of {country}?", f"The capital of {country} is {city}.", \
        f"The capital of {country} is {wrong}."


def _fruit(r):
    fruit, colour = r.choice(FRUITS)
    wrong = r.choice(sorted({c for _, c in FRUITS if c != colour}))
    return f"What colour is a ripe {fruit}?", f"A ripe {fruit} is {colour}.", f"A ripe {fruit} is {wrong}."


def _sum(r):
    a, b = r.randint(1, 40), r.randint(1, 40)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + r.choice((-2, -1, 1, 2, 10))}"


def _reverse(r):
    ws = r.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws)), " ".join(ws)


def _upper(r):
    w = r.choice(WORDS)
    return f"Write {w} in capital letters.", w.upper(), w


def _refuse(r):
    q, good, _ = r.choice((_capital, _fruit, _sum, _sum, _reverse, _upper))(r)
    return q, good, r.choice(REFUSALS)


# A wrong sum is off by a little and unreversed words need the order compared: too subtle for the demo's
# budget, so those questions only meet refusals.
TASKS = (_capital, _fruit, _upper, _refuse, _refuse)


def make_pair(r: random.Random, i: int, split: str) -> dict:
    q, good, bad = r.choice(TASKS)(r)
    system = r.choice(SYSTEMS)
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    chosen = [{"role": "assistant", "content": good}]
    rejected = [{"role": "assistant", "content": bad}]
    rec = {"id": f"demo-pref-{split}-{i:05d}"}
    if i % 3 == 2:  # implicit prompt: two whole conversations sharing their start
        rec.update(chosen=prompt + chosen, rejected=prompt + rejected)
    else:
        rec.update(prompt=prompt, chosen=chosen, rejected=rejected)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    r = random.Random(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        lines = [json.dumps(make_pair(r, i, split), ensure_ascii=False) for i in range(n)]
        (args.out / f"pref_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {n} pairs to {args.out / f'pref_{split}.jsonl'}")


if __name__ == "__main__":
    main()
