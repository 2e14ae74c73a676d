"""Preference losses are averaged over the pairs of the global batch: 1 rank x 4 micro-batches and 2 ranks x 2
(FSDP2 over gloo) give the same loss, gradients and reward metrics, equal to the papers' formulas on a plain
transformers model run pair half by pair half."""

from pathlib import Path

import pytest
import torch

from tests.distributed.tiny import run_on_one_and_two_ranks, save_tiny_hf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pref_split")
    save_tiny_hf(tmp / "init", seed=4)
    run_on_one_and_two_ranks(str(HERE / "pref_split_worker.py"), tmp / "init", tmp, cwd=ROOT)
    return tmp, torch.load(tmp / "1.pt"), torch.load(tmp / "2.pt")


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_1x4_equals_2x2_equals_reference(layouts, loss):
    from transformers import Qwen3ForCausalLM

    from tests.distributed.pref_split_worker import reference_table, rows
    from tests.unit.test_pref_losses import _paper_loss, _seq_logp

    tmp, one, two = layouts
    model = Qwen3ForCausalLM.from_pretrained(str(tmp / "init"), attn_implementation="eager").float()
    pairs, _ = rows()
    ref = reference_table()
    losses = []
    for k, pair in enumerate(pairs):
        (pc, nc), (pr, nr) = (_seq_logp(model, *half) for half in pair)
        beta = 0.1 if loss == "dpo" else 2.0
        losses.append(_paper_loss(loss, pc, pr, nc, nr, float(ref[k, 0]), float(ref[k, 1]), beta))
    expected = torch.stack(losses).mean()
    expected.backward()
    for res in (one[loss], two[loss]):
        assert abs(res["loss"] - float(expected.detach())) < 1e-5
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    for key, value in one[loss]["metrics"].items():
        assert abs(value - two[loss]["metrics"][key]) < 1e-5, key
