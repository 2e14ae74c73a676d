"""Invariant 2: one global batch gives the same loss and gradients as 1 rank x 4 micro-batches,
2 ranks x 2 (FSDP2 over gloo, and HSDP), and 1 rank x 1 -- and equals a plain transformers model run
document by document (the reference, computed here without the engine)."""

from pathlib import Path

import pytest
import torch

from tests.distributed.tiny import ListLoader, reference_loss, run_on_one_and_two_ranks, save_tiny_hf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    save_tiny_hf(tmp / "init", seed=3)
    run_on_one_and_two_ranks(str(HERE / "split_worker.py"), tmp / "init", tmp, cwd=ROOT, timeout=240)
    return tmp, {n: torch.load(tmp / f"{n}.pt") for n in ("1x4", "1x1", "2x2", "2x2-hsdp")}


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_split_invariance_matches_reference(layouts, reduction):
    tmp, results = layouts
    from transformers import Qwen3ForCausalLM

    ref_model = Qwen3ForCausalLM.from_pretrained(str(tmp / "init"), attn_implementation="eager").float()
    rows = ListLoader(1, 4, 0, 1, 1, seed=5).rows_of_step(0)
    ref = reference_loss(ref_model, [d for row in rows for d in row], reduction)
    ref.backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}

    for name, res in results.items():
        r = res[reduction]
        assert abs(r["loss"] - ref.item()) < 1e-5, (name, r["loss"], ref.item())
        assert set(r["grads"]) == set(ref_grads), name
        for pname, g in r["grads"].items():
            torch.testing.assert_close(g, ref_grads[pname], atol=1e-5, rtol=1e-4, msg=f"{name} {pname}")
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()])).item()
        assert abs(r["norm"] - ref_norm) < 1e-5 * max(1.0, ref_norm), (name, r["norm"], ref_norm)
        assert ref_norm > 0.05  # so clipping to 0.05 must scale every gradient
        for pname, g in r["clipped"].items():
            torch.testing.assert_close(g, ref_grads[pname] * (0.05 / ref_norm), atol=1e-6, rtol=1e-4)


def test_reductions_differ(layouts):
    # Guard against a reduction silently ignored: the three losses of one batch must differ.
    _, results = layouts
    losses = [results["1x4"][r]["loss"] for r in ("token", "sample", "square")]
    assert len({round(x, 6) for x in losses}) == 3


def test_random_init_distinct_shards_identical_replicas(layouts):
    tmp, _ = layouts
    res = torch.load(tmp / "random_init.pt")
    assert res == {"fsdp": False, "hsdp": True}


def test_random_init_is_the_same_model_on_any_number_of_ranks(layouts):
    """One seed, one model: the whole initial state dict on 1 rank equals the one gathered from 2 ranks
    (FSDP2 shards, HSDP replicas, Ulysses sequence parallel), value for value."""
    tmp, _ = layouts
    one = torch.load(tmp / "init-1.pt")["state"]
    assert one and all(v.abs().sum() > 0 for k, v in one.items() if k.endswith(("proj.weight", "embed_tokens.weight")))
    for name in ("2-fsdp", "2-hsdp", "2-sp"):
        saved = torch.load(tmp / f"init-{name}.pt")
        other, attn = saved["state"], saved["attn"]
        assert len(set(attn)) == 1, (name, attn)  # rank 0's whole-model init left its model's attention alone
        assert set(other) == set(one), name
        for k, v in one.items():
            assert torch.equal(other[k], v), (name, k)


def test_frozen_parameters_under_fsdp(layouts):
    tmp, _ = layouts
    res = torch.load(tmp / "freeze.pt")
    assert res == {"embed": {"changed": False, "state": False}, "q": {"changed": False, "state": False},
                   "k": {"changed": True, "state": True}}


def test_lora_split_invariance_matches_peft_reference(layouts):
    """Adapters: 1 rank x 4 micro-batches and 2 ranks x 2 (FSDP2 + activation checkpointing) give the loss and
    adapter gradients of peft's own model over the same folder, run document by document."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    tmp, _ = layouts
    results = {n: torch.load(tmp / f"lora-{n}.pt") for n in ("1x4", "2x2")}
    weights = results["1x4"]["weights"]
    assert all(torch.equal(weights[k], results["2x2"]["weights"][k]) for k in weights)  # same start on any layout
    model = Qwen3ForCausalLM.from_pretrained(str(tmp / "init"), attn_implementation="eager").float()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    params = {n: p for n, p in ref.get_base_model().named_parameters() if "lora_" in n}
    assert sorted(params) == sorted(weights)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    rows = ListLoader(1, 4, 0, 1, 1, seed=5).rows_of_step(0)
    want = reference_loss(ref, [d for row in rows for d in row])
    want.backward()
    for name, res in results.items():
        assert abs(res["loss"] - want.item()) < 1e-5, (name, res["loss"], want.item())
        assert sorted(res["grads"]) == sorted(params), name  # gradients for the adapters and nothing else
        for n, g in res["grads"].items():
            torch.testing.assert_close(g, params[n].grad, atol=1e-5, rtol=1e-4, msg=f"{name} {n}")
