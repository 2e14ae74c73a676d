"""Each preference loss and its gradients equal an independent computation: a plain transformers model run
pair half by pair half (unpacked), log_softmax over its logits, and the papers' formulas written out here.
The engine's side runs the pairs packed in one row through PrefLossModel (chunked per-document log-probs)."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.tiny import VOCAB, TinyAdapter, tiny_config
from xtune.config.schema import PrefSpec, RunSpec
from xtune.data.types import IGNORE_INDEX, PackedBatch
from xtune.methods.preference import PrefLossModel


def _pairs(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        halves = []
        for _ in range(2):
            resp = torch.randint(0, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            ids = prompt + resp
            labels = [ids[i + 1] if i + 1 >= len(prompt) else IGNORE_INDEX for i in range(len(ids) - 1)]
            halves.append((ids, labels + [IGNORE_INDEX]))
        out.append(halves)
    return out


def _packed(pairs) -> PackedBatch:
    docs = [d for pair in pairs for d in pair] + [([0] * 5, [IGNORE_INDEX] * 5)]  # a padding document at the end
    ids = [t for d in docs for t in d[0]]
    cu = [0]
    for d in docs:
        cu.append(cu[-1] + len(d[0]))
    return PackedBatch(
        input_ids=torch.tensor([ids]), labels=torch.tensor([[t for d in docs for t in d[1]]]),
        position_ids=torch.tensor([[i for d in docs for i in range(len(d[0]))]]),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(len(d[0]) for d in docs),
        doc_trained_tokens=torch.tensor([sum(t != IGNORE_INDEX for t in d[1]) for d in docs]),
        pair_docs=torch.arange(2 * len(pairs)).view(-1, 2), pair_ids=torch.arange(len(pairs)))


def _seq_logp(model, ids, labels):
    """sum of log pi(label) over the labelled tokens, and their count: one document alone."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    lab = torch.tensor(labels)
    mask = lab != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1)[mask].gather(1, lab[mask][:, None]).squeeze(1)
    return logp.sum(), int(mask.sum())


def _paper_loss(name, pc, pr, nc, nr, rc, rr, beta, eps=0.0, gamma=1.0, lam=0.1):
    """The papers' per-pair losses, written out independently of xtune.methods.preference."""
    if name == "dpo":  # Rafailov et al. 2023 eq. 7; conservative DPO (Mitchell 2023) with eps
        z = beta * ((pc - rc) - (pr - rr))
        return -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
    if name == "ipo":  # Azar et al. 2023 eq. 17: (h - 1/(2 tau))^2
        return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
    if name == "simpo":  # Meng et al. 2024 eq. 6
        z = beta / nc * pc - beta / nr * pr - gamma
        return -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
    if name == "orpo":  # Hong et al. 2024 eq. 6-7: L_SFT + lambda L_OR on length-normalised likelihoods
        p_c, p_r = torch.exp(pc / nc), torch.exp(pr / nr)
        odds = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
        return -pc / nc - lam * torch.log(torch.sigmoid(torch.log(odds)))
    raise AssertionError(name)


def _models(seed=0):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg._attn_implementation = "eager"
    policy = Qwen3ForCausalLM(cfg).float()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs from the policy
    return policy, reference


CASES = [("dpo", {}), ("dpo", {"label_smoothing": 0.2}), ("ipo", {}), ("simpo", {}),
         ("simpo", {"label_smoothing": 0.1, "simpo_gamma": 0.4, "beta": 1.5}), ("orpo", {"orpo_lambda": 0.3})]


@pytest.mark.parametrize("name, kw", CASES)
@pytest.mark.parametrize("loss_mode", ["chunk", "eager"])
def test_loss_and_gradients_match_the_papers_formulas(name, kw, loss_mode):
    pref = PrefSpec(loss=name, **kw)
    beta = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}.get(name, 0.1) if pref.beta is None else pref.beta
    pairs = _pairs()
    policy, ref_model = _models()
    ours = copy.deepcopy(policy)

    # Reference: unpacked, one document at a time, the formula above, mean over pairs.
    with torch.no_grad():
        ref_lp = [[_seq_logp(ref_model, *half)[0] for half in pair] for pair in pairs]
    losses = []
    for pair, (rc, rr) in zip(pairs, ref_lp):
        (pc, nc), (pr, nr) = (_seq_logp(policy, *half) for half in pair)
        losses.append(_paper_loss(name, pc, pr, nc, nr, rc, rr, beta, pref.label_smoothing, pref.simpo_gamma,
                                  pref.orpo_lambda))
    expected = torch.stack(losses).mean()
    expected.backward()

    spec = dataclasses.replace(RunSpec(), method="dpo", pref=pref)
    root = PrefLossModel(ours, TinyAdapter(spec.model), "eager", spec, loss_mode)
    reference = torch.tensor([[float(a), float(b)] for a, b in ref_lp]) if name in ("dpo", "ipo") else None
    loss_sum, _, stats = root(_packed(pairs), reference)
    (loss_sum / len(pairs)).backward()
    got = float(loss_sum.detach()) / len(pairs)
    assert abs(got - float(expected)) < 1e-5 * max(1.0, abs(float(expected))), (got, float(expected))
    for (n, a), (_, b) in zip(policy.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-6 * max(1.0, float(expected)), rtol=1e-4, msg=n)
    assert stats.shape == (6,)


def test_dpo_loss_at_the_first_step_is_ln_2():
    """Reference = the policy (the initial weights): every margin is 0 and the loss is ln 2."""
    pairs = _pairs(seed=1, n=4)
    policy, _ = _models(seed=1)
    spec = dataclasses.replace(RunSpec(), method="dpo")
    root = PrefLossModel(policy, TinyAdapter(spec.model), "eager", spec, "chunk")
    batch = _packed(pairs)
    with torch.no_grad():
        reference = root(batch, logps_only=True)
    loss_sum, _, stats = root(batch, reference)
    assert abs(float(loss_sum) / len(pairs) - math.log(2)) < 1e-7
    assert stats[0] == 0 and stats[1] == 0 and stats[2] == 0  # rewards 0, accuracy 0 (TRL counts chosen > rejected)


def test_packed_pairs_equal_pairs_run_alone():
    """Packing is invisible: the sum over one row of pairs equals the sum of each pair in its own batch."""
    pairs = _pairs(seed=2, n=3)
    policy, _ = _models(seed=2)
    spec = dataclasses.replace(RunSpec(), method="dpo", pref=PrefSpec(loss="simpo"))
    root = PrefLossModel(policy, TinyAdapter(spec.model), "sdpa", spec, "chunk")
    together = root(_packed(pairs))[0]
    alone = sum(root(_packed([p]))[0] for p in pairs)
    assert abs(float(together) - float(alone)) < 1e-5
    assert float(F.relu(together)) > 0
