#!/usr/bin/env python
"""Generate xtune's bundled demo data (deterministic; the output is committed).

    python tools/make_demo_data.py                 # rewrites src/xtune/assets/demo/
    python tools/make_demo_data.py --out /tmp/demo # anywhere else

Text chat (`train.jsonl`, `eval.jsonl`): short synthetic tasks with one right answer each
(reverse words, spell in capitals, small sums, next/previous letter, sort digits, count letters,
a fixed table of capitals and fruit colours, a few greetings), single- and multi-turn, some
with a system prompt. A model of 1-3M parameters learns them visibly within a few hundred steps.

Vision-language chat (`vl_train.jsonl`, `vl_eval.jsonl`, `images/`): PNG images of coloured
shapes drawn pixel by pixel with integer arithmetic (no drawing library, so the pixels do not
depend on the Pillow version), questions about colour, shape, count and background, a few
two-image samples and some text-only samples. Image URLs are relative to the output folder,
which is the datasets' `media_root`.

Everything comes from `random.Random(SEED)`. PNG files are compared by pixels, not bytes
(zlib builds may compress differently); an existing image with the same pixels is left untouched.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
N_TRAIN = 3600
N_EVAL = 240
N_VL_TRAIN = 320
N_VL_EVAL = 28
N_IMAGES = 40
N_EVAL_IMAGES = 6  # the last images are seen only by vl_eval.jsonl

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "xtune" / "assets" / "demo"
IMG = "<IMG_CONTEXT>"

# --------------------------------------------------------------------------- text tasks

WORDS = (
    "apple river moon sun tree house cat dog bird fish stone cloud rain snow book lamp chair "
    "table door window road hill lake star wind fire bread milk salt rice garden winter summer "
    "music paper glass clock train boat horse sheep tiger lemon honey candle forest island "
    "bridge castle pencil rocket"
).split()

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Brazil", "Brasilia"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Australia", "Canberra"),
    ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Chile", "Santiago"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Thailand", "Bangkok"), ("Mexico", "Mexico City"),
)

FRUITS = (
    ("banana", "yellow"), ("lemon", "yellow"), ("strawberry", "red"), ("cherry", "red"),
    ("tomato", "red"), ("raspberry", "red"), ("lime", "green"), ("pear", "green"),
    ("blueberry", "blue"), ("plum", "purple"), ("orange", "orange"), ("apricot", "orange"),
    ("coconut", "brown"), ("blackberry", "black"), ("watermelon", "green"),
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

SYSTEMS = (
    (None, 50),
    ("You are a helpful assistant.", 20),
    ("You are a concise assistant. Answer briefly.", 15),
    ("Always answer in capital letters.", 15),
)
SHOUT = "Always answer in capital letters."

GREETINGS = (
    (("Hello!", "Hi!", "Hi there.", "Good morning!"), "Hello! How can I help you today?"),
    (("Who are you?", "What are you?"), "I am a tiny demo model trained with xtune."),
    (
        ("What can you do?", "What are you good at?"),
        "I can reverse words, write words in capitals, do small sums, sort digits and answer a few facts.",
    ),
)
THANKS = (("Thank you!", "Thanks.", "Great, thanks!"), "You're welcome!")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def t_reverse(r: random.Random):
    ws = r.sample(WORDS, r.randint(3, 4))
    q = r.choice(("Reverse the order of these words: {}", "Reverse the list: {}", "Say these words backwards: {}"))
    ans = " ".join(reversed(ws))
    return q.format(" ".join(ws)), ans, (r.choice(("Now in capital letters.", "Now uppercase them.")), ans.upper())


def t_upper(r: random.Random):
    w = r.choice(WORDS)
    q = r.choice(("Uppercase: {}", "Write {} in capital letters.", "Convert to uppercase: {}"))
    return q.format(w), w.upper(), None


def t_count(r: random.Random):
    w = r.choice(WORDS)
    q = r.choice(("How many letters are in the word {}?", "Count the letters in {}."))
    return q.format(w), f"{w} has {len(w)} letters.", None


def t_arith(r: random.Random):
    a, b = r.randint(0, 49), r.randint(0, 49)
    if r.random() < 0.5:
        q = r.choice(("What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?"))
        c, eq = a + b, f"{a} + {b} = {a + b}"
    else:
        a, b = max(a, b), min(a, b)
        q = r.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?"))
        c, eq = a - b, f"{a} - {b} = {a - b}"
    return q.format(a=a, b=b), eq, ("Add 10 to that.", f"{c} + 10 = {c + 10}")


def t_letter(r: random.Random):
    if r.random() < 0.6:
        i = r.randrange(25)
        q = r.choice(("What comes after {} in the alphabet?", "Which letter follows {}?"))
        return q.format(LETTERS[i]), f"The letter after {LETTERS[i]} is {LETTERS[i + 1]}.", None
    i = r.randrange(1, 26)
    q = r.choice(("What comes before {} in the alphabet?", "Which letter comes just before {}?"))
    return q.format(LETTERS[i]), f"The letter before {LETTERS[i]} is {LETTERS[i - 1]}.", None


def t_sort(r: random.Random):
    ds = [r.randrange(10) for _ in range(r.randint(3, 5))]
    shown = " ".join(map(str, ds))
    if r.random() < 0.7:
        q = r.choice(("Sort these digits: {}", "Sort from smallest to largest: {}"))
        return q.format(shown), " ".join(map(str, sorted(ds))), None
    return f"Sort from largest to smallest: {shown}", " ".join(map(str, sorted(ds, reverse=True))), None


def t_capital(r: random.Random):
    (c, cap), (c2, cap2) = r.sample(CAPITALS, 2)
    follow = (f"And of {c2}?", f"The capital of {c2} is {cap2}.")
    if r.random() < 0.8:
        q = r.choice(("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"))
        return q.format(c), f"The capital of {c} is {cap}.", follow
    return f"{cap} is the capital of which country?", f"{cap} is the capital of {c}.", None


def t_fruit(r: random.Random):
    f, col = r.choice(FRUITS)
    q = r.choice(("What colour is {}?", "What is the colour of {}?", "Tell me the colour of {}."))
    return q.format(_a(f)), f"{_a(f).capitalize()} is {col}.", None


TASKS = (
    (t_reverse, 15), (t_upper, 11), (t_count, 7), (t_arith, 18), (t_letter, 10),
    (t_sort, 13), (t_capital, 14), (t_fruit, 8),
)


def _weighted(r: random.Random, table):
    return r.choices([x for x, _ in table], weights=[w for _, w in table])[0]


def _conversation(r: random.Random) -> list:
    system = _weighted(r, SYSTEMS)
    turns: list = []
    kind = r.random()
    if kind < 0.55:  # one question
        q, a, _ = _weighted(r, TASKS)(r)
        turns.append((q, a))
    elif kind < 0.80:  # two or three unrelated questions
        for _ in range(r.randint(2, 3)):
            q, a, _ = _weighted(r, TASKS)(r)
            turns.append((q, a))
    elif kind < 0.93:  # a follow-up that needs the previous turn
        while True:
            q, a, follow = _weighted(r, TASKS)(r)
            if follow is not None:
                break
        turns += [(q, a), follow]
    else:  # greeting, a question, thanks
        qs, a = r.choice(GREETINGS)
        turns.append((r.choice(qs), a))
        q, a, _ = _weighted(r, TASKS)(r)
        turns.append((q, a))
        if r.random() < 0.6:
            turns.append((r.choice(THANKS[0]), THANKS[1]))
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for q, a in turns:
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": a.upper() if system == SHOUT else a})
    return msgs


def _unique(r: random.Random, make, n: int) -> list:
    seen, out = set(), []
    while len(out) < n:
        msgs = make(r)
        key = json.dumps(msgs, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(msgs)
    return out


def text_data(seed: int = SEED):
    r = random.Random(seed)
    convs = _unique(r, _conversation, N_TRAIN + N_EVAL)
    r.shuffle(convs)
    ev, tr = convs[:N_EVAL], convs[N_EVAL:]
    return (
        [{"id": f"demo-train-{i:05d}", "messages": m} for i, m in enumerate(tr)],
        [{"id": f"demo-eval-{i:05d}", "messages": m} for i, m in enumerate(ev)],
    )


# --------------------------------------------------------------------------- images

COLOURS = (
    ("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 80, 220)),
    ("yellow", (240, 210, 40)), ("purple", (140, 60, 180)), ("orange", (245, 140, 30)),
)
BACKGROUNDS = (("white", (255, 255, 255)), ("grey", (200, 200, 200)), ("black", (20, 20, 20)))
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ((64, 64), (96, 64), (64, 96), (128, 96), (96, 128), (80, 80), (128, 64), (112, 80))
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SIDES = {"circle": "0", "square": "4", "triangle": "3", "diamond": "4"}


def _inside(shape: str, x2: int, y2: int, r2: int) -> bool:
    """Is the pixel centre at doubled offset (x2, y2) from the shape centre inside a shape of doubled radius r2?"""
    if shape == "circle":
        return x2 * x2 + y2 * y2 <= r2 * r2
    if shape == "square":
        return abs(x2) <= r2 * 4 // 5 and abs(y2) <= r2 * 4 // 5
    if shape == "diamond":
        return abs(x2) + abs(y2) <= r2
    # triangle pointing up: apex (0, -r2), base y = r2 * 3 // 4, half width r2
    base = r2 * 3 // 4
    if y2 > base or y2 < -r2:
        return False
    return 2 * abs(x2) * (base + r2) <= 2 * r2 * (y2 + r2)


def draw(spec: dict) -> bytes:
    """RGB bytes of one image: `count` equal shapes in a row (or column, for portrait images)."""
    w, h = spec["size"]
    bg, fg, n = spec["bg_rgb"], spec["rgb"], spec["count"]
    horizontal = w >= h
    cell = (w if horizontal else h) // n
    other = h if horizontal else w
    r2 = min(cell, other) * 7 // 10  # doubled radius = 0.7 of the smaller cell side
    centres2 = []
    for k in range(n):
        along = cell * (2 * k + 1)  # doubled coordinate of the cell centre
        centres2.append((along, other) if horizontal else (other, along))
    px = bytearray()
    for y in range(h):
        for x in range(w):
            hit = any(_inside(spec["shape"], 2 * x + 1 - cx, 2 * y + 1 - cy, r2) for cx, cy in centres2)
            px += bytes(fg if hit else bg)
    return bytes(px)


def image_specs(seed: int = SEED) -> list:
    r = random.Random(seed + 1)
    combos = [(s, c) for s in SHAPES for c in range(len(COLOURS))]
    r.shuffle(combos)
    while len(combos) < N_IMAGES:
        combos.append((r.choice(SHAPES), r.randrange(len(COLOURS))))
    specs = []
    for i, (shape, ci) in enumerate(combos[:N_IMAGES]):
        bg_name, bg_rgb = BACKGROUNDS[r.choice((0, 0, 0, 1, 1, 2))]
        name, rgb = COLOURS[ci]
        specs.append({
            "file": f"images/shape_{i:03d}.png",
            "size": SIZES[i % len(SIZES)],
            "shape": shape, "colour": name, "rgb": rgb, "bg": bg_name, "bg_rgb": bg_rgb,
            "count": r.choice((1, 1, 1, 2, 3)),
        })
    return specs


def _describe(s: dict) -> str:
    n = s["count"]
    thing = f"{s['colour']} {s['shape']}" + ("s" if n > 1 else "")
    head = _a(thing) if n == 1 else f"{NUMBER_WORDS[n]} {thing}"
    return f"{head} on a {s['bg']} background"


def _img_item(s: dict) -> dict:
    return {"type": "image_url", "image_url": {"url": s["file"], "image_wh": list(s["size"])}}


def _one_image_qa(r: random.Random, s: dict):
    many = s["count"] > 1
    kind = r.randrange(5)
    if kind == 0:
        q = r.choice(("What colour are the shapes?",) if many else ("What colour is the shape?", "What colour is it?"))
        return q, s["colour"]
    if kind == 1:
        return r.choice(("What shape is this?", "What shape do you see?")), s["shape"]
    if kind == 2:
        return r.choice(("How many shapes are there?", "Count the shapes.")), str(s["count"])
    if kind == 3:
        return "What colour is the background?", s["bg"]
    return r.choice(("Describe the image.", "What is in the picture?")), _describe(s).capitalize() + "."


def _vl_conversation(r: random.Random, imgs: list) -> list:
    kind = r.random()
    if kind < 0.12:  # text only
        k = r.randrange(3)
        if k == 0:
            sh = r.choice(SHAPES)
            return [{"role": "user", "content": f"How many sides does a {sh} have?"},
                    {"role": "assistant", "content": SIDES[sh]}]
        if k == 1:
            a, b, c = r.choice((("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple")))
            if r.random() < 0.5:
                a, b = b, a
            return [{"role": "user", "content": f"What colour do you get by mixing {a} and {b}?"},
                    {"role": "assistant", "content": c}]
        msgs = _conversation(r)
        return [m for m in msgs if m["role"] != "system"]
    if kind < 0.27:  # two images
        s1, s2 = r.sample(imgs, 2)
        k = r.randrange(3)
        if k == 0:
            q = "Do the two shapes have the same colour?"
            a = (f"Yes, both are {s1['colour']}." if s1["colour"] == s2["colour"]
                 else f"No, the first is {s1['colour']} and the second is {s2['colour']}.")
        elif k == 1:
            q = "Describe the two images."
            a = f"The first image shows {_describe(s1)}. The second image shows {_describe(s2)}."
        else:
            q = "Which image has more shapes?"
            a = ("They have the same number." if s1["count"] == s2["count"]
                 else ("The first." if s1["count"] > s2["count"] else "The second."))
        return [{"role": "user", "content": [_img_item(s1), _img_item(s2), {"type": "text", "text": f"{IMG}\n{IMG}\n{q}"}]},
                {"role": "assistant", "content": a}]
    s = r.choice(imgs)  # one image, one to three questions
    q, a = _one_image_qa(r, s)
    msgs = [{"role": "user", "content": [_img_item(s), {"type": "text", "text": f"{IMG}\n{q}"}]},
            {"role": "assistant", "content": a}]
    for _ in range(r.choice((0, 0, 1, 2))):
        q, a = _one_image_qa(r, s)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def vl_data(specs: list, seed: int = SEED):
    train_imgs, eval_imgs = specs[:-N_EVAL_IMAGES], specs[-N_EVAL_IMAGES:]
    r = random.Random(seed + 2)
    tr = _unique(r, lambda rr: _vl_conversation(rr, train_imgs), N_VL_TRAIN)
    seen = {json.dumps(m, sort_keys=True) for m in tr}
    ev = [m for m in _unique(r, lambda rr: _vl_conversation(rr, eval_imgs), 2 * N_VL_EVAL)
          if json.dumps(m, sort_keys=True) not in seen][:N_VL_EVAL]
    return (
        [{"id": f"demo-vl-train-{i:04d}", "messages": m} for i, m in enumerate(tr)],
        [{"id": f"demo-vl-eval-{i:04d}", "messages": m} for i, m in enumerate(ev)],
    )


# --------------------------------------------------------------------------- writing

README = """\
# xtune demo data (generated; do not edit by hand)

Written by `tools/make_demo_data.py` (seed {seed}); regenerate with `python tools/make_demo_data.py`.

- `train.jsonl` ({n_tr} conversations) and `eval.jsonl` ({n_ev}, disjoint): synthetic chat tasks with one
  right answer each (reverse words, words in capital letters, small sums, next/previous letter, sort digits,
  count letters, capital cities, fruit colours, greetings); single- and multi-turn, some with a system prompt.
- `vl_train.jsonl` ({n_vtr}) and `vl_eval.jsonl` ({n_vev}): questions about `images/` ({n_img} PNGs of coloured
  shapes; the last {n_eimg} are used only for eval), including two-image and text-only samples.
  Image URLs are relative to this folder (the datasets' `media_root`).

Used by `recipe=demo` and `recipe=intern_s1_mini model=intern_s1_tiny`.
"""


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _write_png(path: Path, size, rgb: bytes) -> None:
    from PIL import Image

    if path.exists():
        with Image.open(path) as old:
            if old.mode == "RGB" and old.size == tuple(size) and old.tobytes() == rgb:
                return  # same pixels: keep the committed bytes
    Image.frombytes("RGB", tuple(size), rgb).save(path, format="PNG", optimize=True)


def generate(out: Path, seed: int = SEED) -> None:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tr, ev = text_data(seed)
    specs = image_specs(seed)
    vtr, vev = vl_data(specs, seed)
    for name, rows in (("train", tr), ("eval", ev), ("vl_train", vtr), ("vl_eval", vev)):
        (out / f"{name}.jsonl").write_bytes(_jsonl(rows))
    wanted = set()
    for s in specs:
        _write_png(out / s["file"], s["size"], draw(s))
        wanted.add(Path(s["file"]).name)
    for stale in (out / "images").glob("*.png"):
        if stale.name not in wanted:
            stale.unlink()
    (out / "README.md").write_text(
        README.format(seed=seed, n_tr=len(tr), n_ev=len(ev), n_vtr=len(vtr), n_vev=len(vev),
                      n_img=len(specs), n_eimg=N_EVAL_IMAGES),
        encoding="utf-8", newline="\n",
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=SEED)
    a = p.parse_args(argv)
    generate(a.out, a.seed)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
