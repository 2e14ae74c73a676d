"""The flagship command with a tokenizer folder like the real Intern-S1-mini's (remote-code Python
tokenizer with a SMILES sentencepiece sub-tokenizer, no tokenizer.json; tests/s1_fixture.py):

    xtune sft recipe=intern_s1_mini model=intern_s1_tiny model.tokenizer=<folder> ...

Without `model.trust_remote_code=true` it stops at validation with exit 2, naming the .py file that
would run and the key, and that code never ran (the fixture's module writes a marker file when
imported). With consent it trains on 2 ranks, text with SMILES spans + images, and writes samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.integration.test_model_families import train_records, xtune_cli
from tests.s1_fixture import MODULE_FILE

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "xtune" / "assets" / "demo"


def _run(args, tmp_path, marker, timeout=180):
    env = {"XTUNE_TEST_REMOTE_CODE_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    return xtune_cli(args, timeout, env)


@pytest.fixture
def smiles_data(write_jsonl):
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:40]
    recs = [json.loads(x) for x in lines] + [
        {"messages": [{"role": "user", "content": f"Describe <SMILES>{s}</SMILES>."},
                      {"role": "assistant", "content": f"It is <SMILES>{s}</SMILES>, a molecule."}]}
        for s in ("CCO", "C1=CC=CC=C1", "CC(=O)OC1=CC=CC=C1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C")]
    return write_jsonl("text.jsonl", recs)


def test_remote_tokenizer_needs_consent_then_trains_on_two_ranks(s1_tok_dir, smiles_data, tmp_path):
    marker = tmp_path / "imported.txt"
    base = ["recipe=intern_s1_mini", "model=intern_s1_tiny", f"model.tokenizer={s1_tok_dir}",
            f"data.datasets.0.path={smiles_data}", f"data.cache_dir={tmp_path / 'cache'}"]

    for cmd in (["sft", *base, f"train.work_dir={tmp_path / 'refused'}"], ["data", "inspect", *base]):
        code, out = _run(cmd, tmp_path, marker)
        assert code == 2, out[-3000:]
        assert str(s1_tok_dir / MODULE_FILE) in out and "model.trust_remote_code=true" in out, out[-3000:]
        assert "Traceback" not in out
        assert not marker.exists(), "the tokenizer's code ran without consent"
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()

    run = tmp_path / "run"
    code, out = _run(["sft", *base, "model.trust_remote_code=true", "parallel=cpu2", "train.epochs=null",
                      "train.max_steps=2", "train.global_batch_size=2", "train.log_every=1", "train.save_every=0",
                      "data.pack_max_length=1024", "data.sample_max_length=1024", "data.num_workers=2",
                      "logging.tensorboard=false", "train.sample_prompts=['Describe <SMILES>CCO</SMILES>.']",
                      "train.sample_max_new_tokens=4", f"train.work_dir={run}"], tmp_path, marker, timeout=300)
    assert code == 0, out[-5000:]
    assert marker.exists()  # consent given: the code ran (so the check above can fail)
    recs = train_records(run)
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["Describe <SMILES>CCO</SMILES>."]
    assert (run / "hf" / MODULE_FILE).is_file() and (run / "hf" / "tokenizer_SMILES.model").is_file()
