"""Generation on 2 ranks equals 1 rank (greedy): each rank generates its share of the prompts, results are gathered
in input order; log-likelihoods too. Both for a folder every rank loads whole and for the live FSDP2 training model
(sharded over the 2 ranks, its decoder on xtune's packed attention, as the trainer builds it); that model then
still trains (a forward and backward through its root after generating before any training step)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.generate_cases import LOGLIK_PAIRS, PROMPTS, SPECS
from tests.distributed.tiny import child_env, free_port
from tests.integration.test_model_families import make_original
from xtune.generate import Generator

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen2") / "dense"
    make_original("qwen3_tiny", path)
    return path


@pytest.mark.parametrize("mode", ["folder", "fsdp"])
def test_two_ranks_generate_what_one_rank_generates(folder, tmp_path, mode):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           str(HERE / "generate_worker.py"), str(folder), str(tmp_path), mode],
                          env=child_env(), cwd=HERE.parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / f"{mode}.json").read_text())
    one = Generator.from_path(folder)
    want = [[[c.token_ids, c.text, c.finish_reason] for c in cs] for spec in SPECS for cs in one.generate(PROMPTS, spec)]
    assert got["completions"] == want
    assert any(c[2] == "stop" for cs in want for c in cs)  # the stop strings ended some rows early
    assert got["loglik"] == pytest.approx(one.loglikelihood(LOGLIK_PAIRS), abs=1e-4)
