"""The bundled demo data is exactly what tools/make_demo_data.py writes, and it is well formed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "xtune" / "assets" / "demo"
TOOL = ROOT / "tools" / "make_demo_data.py"
IMG = "<IMG_CONTEXT>"
ROLES = {"system", "user", "assistant"}

def _load_tool():
    spec = importlib.util.spec_from_file_location("make_demo_data", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(folder: Path) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _rows(name: str) -> list:
    rows = []
    with open(DEMO / name, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.endswith("\n") and line.strip(), f"{name}:{n} is empty or unterminated"
            rows.append(json.loads(line))
    return rows


@pytest.mark.skipif(not TOOL.is_file(), reason="needs the source checkout's tools/")
def test_committed_files_match_generator(tmp_path):
    from PIL import Image

    _load_tool().generate(tmp_path)
    # pref_*.jsonl (the dpo demo) and grpo_*.jsonl come from their own generators (tools/make_demo_pref.py,
    # tools/make_demo_grpo.py); demo_rewards.py is the grpo demo's hand-written reward code
    others = ("pref_", "grpo_", "demo_rewards.py")
    assert _files(tmp_path) == [f for f in _files(DEMO) if not f.startswith(others)]
    for rel in _files(tmp_path):
        if rel.endswith(".png"):  # compare pixels: zlib builds may compress the same pixels differently
            with Image.open(tmp_path / rel) as a, Image.open(DEMO / rel) as b:
                assert (a.mode, a.size) == (b.mode, b.size), rel
                assert a.tobytes() == b.tobytes(), f"{rel}: pixels differ; rerun tools/make_demo_data.py"
        else:
            assert (tmp_path / rel).read_bytes() == (DEMO / rel).read_bytes(), (
                f"{rel} differs from the generator's output; rerun tools/make_demo_data.py"
            )


def _check_text_messages(msgs, where):
    assert isinstance(msgs, list) and msgs, where
    for i, m in enumerate(msgs):
        assert set(m) == {"role", "content"} and m["role"] in ROLES, where
        assert m["role"] != "system" or i == 0, f"{where}: system prompt not first"
    assert msgs[-1]["role"] == "assistant", where
    for m in msgs:
        if m["role"] == "assistant":
            assert isinstance(m["content"], str) and m["content"].strip(), where


@pytest.mark.parametrize("split", ["train", "eval"])
def test_text_rows_are_plain_chat(split):
    rows = _rows(f"{split}.jsonl")
    for r in rows:
        assert set(r) == {"id", "messages"}
        _check_text_messages(r["messages"], r["id"])
        assert all(isinstance(m["content"], str) for m in r["messages"]), r["id"]
        assert IMG not in json.dumps(r)
    assert any(len(r["messages"]) > 3 for r in rows), "no multi-turn conversation"
    assert any(r["messages"][0]["role"] == "system" for r in rows), "no system prompt"


@pytest.mark.parametrize("split", ["vl_train", "vl_eval"])
def test_vl_rows_images_and_placeholders(split):
    from PIL import Image

    n_images = {0: 0, 1: 0, 2: 0}
    for r in _rows(f"{split}.jsonl"):
        _check_text_messages(r["messages"], r["id"])
        total = 0
        for m in r["messages"]:
            if isinstance(m["content"], str):
                assert IMG not in m["content"], r["id"]
                continue
            assert m["role"] == "user", r["id"]
            imgs = [c for c in m["content"] if c["type"] == "image_url"]
            texts = [c["text"] for c in m["content"] if c["type"] == "text"]
            assert len(imgs) + len(texts) == len(m["content"]), r["id"]
            assert sum(t.count(IMG) for t in texts) == len(imgs), f"{r['id']}: placeholders != images"
            for c in imgs:
                url, wh = c["image_url"]["url"], c["image_url"]["image_wh"]
                assert not Path(url).is_absolute() and ".." not in url, r["id"]
                with Image.open(DEMO / url) as im:
                    assert list(im.size) == wh, f"{r['id']}: image_wh {wh} != real size {im.size} of {url}"
            total += len(imgs)
        n_images[total] += 1
    assert all(n_images.values()), f"{split}: want text-only, one-image and two-image samples, got {n_images}"


def test_splits_disjoint_and_sizes():
    for tr_name, ev_name in (("train", "eval"), ("vl_train", "vl_eval")):
        tr, ev = _rows(f"{tr_name}.jsonl"), _rows(f"{ev_name}.jsonl")
        key = lambda r: json.dumps(r["messages"], sort_keys=True)  # noqa: E731
        assert len({key(r) for r in tr}) == len(tr) and len({key(r) for r in ev}) == len(ev)
        assert not {key(r) for r in tr} & {key(r) for r in ev}, f"{tr_name}/{ev_name} share conversations"
        ids = [r["id"] for r in tr + ev]
        assert len(set(ids)) == len(ids)
        assert 0.05 <= len(ev) / len(tr) <= 0.10
    assert (DEMO / "train.jsonl").stat().st_size < 1_500_000
    assert (DEMO / "eval.jsonl").stat().st_size < 1_500_000
    pngs = list((DEMO / "images").glob("*.png"))
    assert 24 <= len(pngs) <= 48
    assert sum(p.stat().st_size for p in pngs) < 200_000
