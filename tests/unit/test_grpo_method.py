"""The grpo root on a packed row of completions equals an independent computation: plain transformers run on each
prompt + completion alone, log_softmax over its logits, and the GRPO objective written out (DAPO's token mean here);
values and gradients, with a reference model for the KL term."""

import copy
import dataclasses

import pytest
import torch

from tests.distributed.tiny import VOCAB, TinyAdapter, tiny_config
from xtune.config.schema import GenSpec, GrpoSpec, RunSpec
from xtune.methods.grpo import GrpoLossModel, GrpoMethod
from xtune.methods.grpo_sample import Completion, pack


def _rollout(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for _ in range(n):
        prompts.append(torch.randint(0, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist())
        length = int(torch.randint(1, 8, (1,), generator=g))
        comps.append(Completion(torch.randint(0, VOCAB, (length,), generator=g).tolist(), truncated=length >= 5))
    adv = torch.randn(n, generator=g)
    return prompts, comps, adv


def _policy_and_reference(seed=0):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg._attn_implementation = "eager"
    policy = Qwen3ForCausalLM(cfg).float()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


def _token_logps(model, prompt, completion):
    """log pi(completion token | prefix) for each completion token, the document alone."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    return torch.stack([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)])


@pytest.mark.parametrize("loss_mode", ["chunk", "eager"])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_packed_root_equals_each_completion_alone(loss_mode, mask_truncated):
    prompts, comps, adv = _rollout()
    policy, ref_model = _policy_and_reference()
    ours = copy.deepcopy(policy)
    beta, eps, eps_high = 0.05, 0.2, 0.28
    keep = torch.tensor([not (mask_truncated and c.truncated) for c in comps])
    assert (~keep).any() == mask_truncated

    # independent: per completion, DAPO's objective with the k3 KL; old policy = a perturbed copy (ratio != 1)
    old_model = copy.deepcopy(policy)
    with torch.no_grad():
        for p in old_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        old = [_token_logps(old_model, p, c.ids) for p, c in zip(prompts, comps)]
        ref = [_token_logps(ref_model, p, c.ids) for p, c in zip(prompts, comps)]
    total, tokens = 0.0, 0
    for i, (p, c) in enumerate(zip(prompts, comps)):
        if not keep[i]:
            continue
        lp = _token_logps(policy, p, c.ids)
        r = torch.exp(lp - old[i])
        surrogate = torch.minimum(r * adv[i], torch.clamp(r, 1 - eps, 1 + eps_high) * adv[i])
        kl = torch.exp(ref[i] - lp) - (ref[i] - lp) - 1
        total = total + (-(surrogate - beta * kl)).sum()
        tokens += len(c.ids)
    expected = total / tokens
    expected.backward()

    spec = dataclasses.replace(RunSpec(), method="grpo", grpo=GrpoSpec(loss="dapo", beta=beta, epsilon=eps,
                                                                       epsilon_high=eps_high))
    root = GrpoLossModel(ours, TinyAdapter(spec.model), "eager", spec, loss_mode)
    batch = pack(prompts, comps, adv, keep)
    batch.old_logp, batch.ref_logp = torch.cat(old), torch.cat(ref)
    num, aux, stats = root(batch)
    method = GrpoMethod(spec)
    w = method.normaliser(batch)
    assert w == tokens and aux is None
    (num / w).backward()
    assert abs(float(num.detach()) / w - float(expected.detach())) < 1e-5
    for (n, a), (_, b) in zip(policy.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=n)
    # the per-token log-probs alone (the reference / old-policy pass)
    with torch.no_grad():
        torch.testing.assert_close(root(batch, logps_only=True),
                                   torch.cat([_token_logps(ours, p, c.ids) for p, c in zip(prompts, comps)]),
                                   atol=1e-5, rtol=1e-5)
    metrics = dict(zip(method.stat_names, stats.tolist()))
    assert metrics["tokens"] == tokens and metrics["entropy"] > 0


def test_normaliser_follows_the_loss_type():
    prompts, comps, adv = _rollout(1, n=4)
    batch = pack(prompts, comps, adv, torch.tensor([True, False, True, True]))
    kept = sum(len(c.ids) for c, k in zip(comps, [True, False, True, True]) if k)
    for loss, want in (("grpo", 4), ("dr_grpo", 4 * 32), ("dapo", kept)):
        spec = dataclasses.replace(RunSpec(), method="grpo", grpo=GrpoSpec(loss=loss), gen=GenSpec(max_new_tokens=32))
        assert GrpoMethod(spec).normaliser(batch) == want


def test_completion_rows_shift_labels_inside_the_document():
    b = pack([[1, 2, 3]], [Completion([4, 5], False)], torch.zeros(1), torch.ones(1, dtype=torch.bool))
    # labels shifted inside the document: the last prompt position predicts the first completion token
    assert b.labels.tolist() == [[-100, -100, 4, 5, -100]] and b.position_ids.tolist() == [[0, 1, 2, 3, 4]]
