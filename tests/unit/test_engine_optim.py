"""LR schedules, AdamW parameter groups / implementations, and the loss-reduction token weights."""

import copy
import math

import pytest
import torch

from xtune.config.schema import OptimSpec, SchedSpec
from xtune.data.types import IGNORE_INDEX, PackedBatch
from xtune.engine.optim import build_optimizer, build_scheduler, lr_factor
from xtune.methods.sft_objective import token_weights, weight_sum


def lrs(sched, total, lr=1.0):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=lr)
    s = build_scheduler(opt, sched, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_cosine_with_warmup_and_floor():
    got = lrs(SchedSpec(type="cosine", warmup_ratio=0.2, min_lr_ratio=0.1), 10, lr=2.0)
    # warmup: 2 steps rising to the peak; then cosine over steps 2..9 down to 0.1 * peak at the last step.
    want = [1.0, 2.0] + [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 7))) for k in range(8)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-1] == pytest.approx(0.2)


def test_linear_and_constant():
    lin = lrs(SchedSpec(type="linear", warmup_ratio=0.0, min_lr_ratio=0.0), 5)
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = lrs(SchedSpec(type="constant", warmup_ratio=0.5, min_lr_ratio=0.0), 4)
    assert const == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_schedule_degenerate_lengths():
    f = lr_factor(SchedSpec(type="cosine", warmup_ratio=0.03, min_lr_ratio=0.0), 1)
    assert f(0) == 1.0  # one-step run: warmup of 1 reaches the peak
    f = lr_factor(SchedSpec(type="cosine", warmup_ratio=0.0, min_lr_ratio=0.0), 2)
    assert [f(0), f(1)] == pytest.approx([1.0, 0.0])


def test_adamw_groups_frozen_and_impls():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    for impl, flags in [("auto", {"fused": True}), ("foreach", {"foreach": True}), ("for", {"foreach": False}),
                        ("fused", {"fused": True})]:
        opt = build_optimizer(model.parameters(), OptimSpec(lr=0.1, weight_decay=0.5, impl=impl), torch.device("cpu"))
        for k, v in flags.items():
            assert opt.defaults[k] == v, impl
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
        assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
        assert len(no_decay["params"]) == 4  # biases and the norm's weight/bias
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        assert model[2].weight not in opt.state  # frozen: no optimizer state
        assert model[0].weight in opt.state


def test_muon_takes_hidden_matrices_adamw_the_rest_and_state_round_trips():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from xtune.engine.optim import MuonWithAdamW, io_param_ids

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    named = list(model.named_parameters())
    spec = OptimSpec(name="muon", lr=0.01, momentum=0.95, nesterov=True, weight_decay=0.1)
    opt = build_optimizer(named, spec, torch.device("cpu"), io_param_ids(model))
    assert isinstance(opt, MuonWithAdamW)
    assert set(opt.muon_names) == {n for n, p in named if p.ndim == 2 and "layers." in n}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(opt.adamw_names)
    muon, adamw = opt.inner
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)

    def step(o):
        model(input_ids=torch.arange(8)[None]).logits.sum().backward()
        o.step()
        o.zero_grad()

    step(opt)
    saved, weights = copy.deepcopy(opt.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}
    step(opt)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    # A fresh optimizer loaded from the saved state repeats the second step exactly (both halves).
    model.load_state_dict(weights)
    fresh = build_optimizer(named, spec, torch.device("cpu"), io_param_ids(model))
    fresh.load_state_dict(saved)
    assert fresh.inner[0].state is fresh.state and fresh.inner[1].param_groups[0] is fresh.param_groups[-2]
    step(fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(v, after[k]), k


def _batch(doc_lens, trained):
    """Docs of the given lengths; the last `trained[i]` positions of doc i carry a label."""
    labels, cu = [], [0]
    for n, t in zip(doc_lens, trained):
        labels += [IGNORE_INDEX] * (n - t) + [1] * t
        cu.append(cu[-1] + n)
    T = cu[-1]
    return PackedBatch(input_ids=torch.zeros(1, T, dtype=torch.long), labels=torch.tensor([labels]),
                       position_ids=torch.zeros(1, T, dtype=torch.long),
                       cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(doc_lens))


def test_token_weights():
    b = _batch([5, 3, 4], [4, 1, 0])
    assert token_weights(b, "token") is None
    assert weight_sum(b, "token") == 5
    w = token_weights(b, "sample")
    assert w.tolist() == pytest.approx([0] + [0.25] * 4 + [0, 0, 1.0] + [0] * 4)
    assert weight_sum(b, "sample") == pytest.approx(2.0)  # one per document with a trained token
    w = token_weights(b, "square")
    assert w.tolist() == pytest.approx([0] + [0.5] * 4 + [0, 0, 1.0] + [0] * 4)
    assert weight_sum(b, "square") == pytest.approx(4 * 0.5 + 1.0)
