"""GRPO's advantages and losses equal the papers' formulas written out here independently (Python loops over
completions and tokens, statistics.stdev), on hand-made log-probs and rewards: values and gradients, for each
loss type, both importance levels, clip-higher, with and without the KL term, truncated completions masked, any
split into micro-batches. And with a first pass (ratio 1, beta 0) the gradient is the plain policy gradient."""

import math
import statistics

import pytest
import torch

from xtune.methods.grpo_advantages import advantages, zero_std_groups
from xtune.methods.grpo_loss import LossConfig, k3, normaliser, policy_loss

# ----------------------------------------------------------------------------------------- advantages


def _paper_advantages(rewards, G, kind, scale):
    """GRPO: (r - mean) / (std + 1e-4); RLOO: r minus the mean of the other G-1; scaled the same way."""
    out = []
    all_std = statistics.stdev(rewards)
    for k in range(0, len(rewards), G):
        group = rewards[k:k + G]
        for i, r in enumerate(group):
            if kind == "group":
                a = r - statistics.fmean(group)
            else:
                a = r - statistics.fmean(group[:i] + group[i + 1:])
            div = {"group": statistics.stdev(group), "batch": all_std, "none": None}[scale]
            out.append(a if div is None else a / (div + 1e-4))
    return out


@pytest.mark.parametrize("kind", ["group", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_the_formulas(kind, scale):
    rewards = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 0.25, 0.0, 1.5]  # the middle group has zero std
    got = advantages(torch.tensor(rewards), 4, kind, scale)
    ref = torch.tensor(_paper_advantages(rewards, 4, kind, scale), dtype=torch.float32)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert (got[4:8] == 0).all()  # a constant group carries no signal, whatever the scale
    assert zero_std_groups(torch.tensor(rewards), 4).tolist() == [False, True, False]


def test_advantages_refuse_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="multiple of num_generations=4"):
        advantages(torch.zeros(6), 4)


# ----------------------------------------------------------------------------------------- losses

LENGTHS = [3, 5, 1, 4, 6, 2]  # six completions (three groups of two), ragged
L_MAX = 8


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.4  # ratios on both sides of the clip range
    ref = logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, -0.2], dtype=torch.float64)
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    return logp, old, ref, adv, doc


def _tokens(x, i):
    start = sum(LENGTHS[:i])
    return [x[start + t] for t in range(LENGTHS[i])]


def _paper_loss(loss, logp, old, ref, adv, eps_low, eps_high, beta, level, keep):
    """The papers' objectives (negated), completion by completion and token by token.
    GRPO (Shao et al. 2024, eq. 3): 1/G sum_i 1/|o_i| sum_t [min(r A, clip(r) A) - beta KL_k3]
    Dr. GRPO (Liu et al. 2025): sum_i sum_t [...] / (G * L_max)
    DAPO (Yu et al. 2025, eq. 8): 1 / sum_i |o_i| sum_i sum_t [...], clip range [1 - eps_low, 1 + eps_high]
    GSPO (Zheng et al. 2025): r = s_i = (pi / pi_old)(y_i) ^ (1 / |y_i|) for every token of y_i"""
    total, n_tokens = 0.0, 0
    for i in range(len(LENGTHS)):
        lp, lo, lr = _tokens(logp, i), _tokens(old, i), _tokens(ref, i)
        s_i = torch.exp(sum(a - b for a, b in zip(lp, lo)) / len(lp))
        terms = []
        for t in range(len(lp)):
            r = torch.exp(lp[t] - lo[t]) if level == "token" else s_i
            surrogate = torch.minimum(r * adv[i], torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv[i])
            kl = torch.exp(lr[t] - lp[t]) - (lr[t] - lp[t]) - 1
            terms.append(surrogate - beta * kl)
        if not keep[i]:
            continue
        n_tokens += len(lp)
        total = total + (sum(terms) / len(lp) if loss == "grpo" else sum(terms))
    G = len(LENGTHS)
    denom = {"grpo": G, "dr_grpo": G * L_MAX, "dapo": n_tokens}[loss]
    return -total / denom


def _ours(cfg, logp, old, ref, adv, doc, keep, parts=((0, 6),)):
    """xtune's loss over a batch split into micro-batches (completion ranges), normalised by the global W."""
    keep_t = torch.tensor(keep)
    kept_tokens = sum(n for n, k in zip(LENGTHS, keep) if k)
    w = sum(normaliser(cfg.loss, b - a, sum(n for n, k in zip(LENGTHS[a:b], keep[a:b]) if k), L_MAX)
            for a, b in parts)
    assert w == normaliser(cfg.loss, len(LENGTHS), kept_tokens, L_MAX)
    total, stats = 0.0, 0.0
    for a, b in parts:
        sel = (doc >= a) & (doc < b)
        num, st = policy_loss(cfg, logp[sel], adv[a:b], doc[sel] - a, old_logp=old[sel],
                              ref_logp=ref[sel], keep=keep_t[a:b])
        total, stats = total + num, stats + st
    return total / w, stats


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps_high, beta", [(None, 0.0), (0.28, 0.0), (None, 0.04), (0.28, 0.1)])
def test_each_loss_and_gradient_equal_the_paper(loss, level, eps_high, beta):
    logp, old, ref, adv, doc = _case()
    keep = [True] * 6
    cfg = LossConfig(loss, 0.2, eps_high, level, beta)
    x1, x2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    got, _ = _ours(cfg, x1, old, ref, adv, doc, keep)
    ref_loss = _paper_loss(loss, x2, old, ref, adv, 0.2, eps_high if eps_high is not None else 0.2, beta, level, keep)
    torch.testing.assert_close(got.double(), ref_loss, atol=1e-6, rtol=1e-6)
    got.backward()
    ref_loss.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    assert x1.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_masked_truncated_completions_and_any_micro_batch_split(loss):
    logp, old, ref, adv, doc = _case(1)
    keep = [True, False, True, True, False, True]  # completions 1 and 4 hit the length limit
    cfg = LossConfig(loss, 0.2, 0.28, "token", 0.05)
    x1, x2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    got, stats = _ours(cfg, x1, old, ref, adv, doc, keep, parts=((0, 1), (1, 4), (4, 6)))
    ref_loss = _paper_loss(loss, x2, old, ref, adv, 0.2, 0.28, 0.05, "token", keep)
    torch.testing.assert_close(got.double(), ref_loss, atol=1e-6, rtol=1e-6)
    got.backward()
    ref_loss.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    masked = (doc == 1) | (doc == 4)
    assert (x1.grad[masked] == 0).all() and stats[0] == sum(n for n, k in zip(LENGTHS, keep) if k)


def test_clip_statistics_count_the_tokens_the_clip_stops():
    logp, old, ref, adv, doc = _case(2)
    _, stats = policy_loss(LossConfig("dapo", 0.2, 0.28, "token", 0.1), logp, adv, doc, old_logp=old, ref_logp=ref)
    r, a = torch.exp(logp - old), adv[doc]
    low = int(((r < 0.8) & (a < 0)).sum())
    high = int(((r > 1.28) & (a > 0)).sum())
    assert low > 0 and high > 0  # the case exercises both sides
    assert stats.tolist()[:5] == pytest.approx([len(doc), float(k3(logp, ref).sum()), low, high, low + high])


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_first_pass_ratio_is_one_and_the_gradient_is_the_plain_policy_gradient(loss, level):
    """num_iterations=1, beta=0: old = the policy itself, so w = exp(0) = 1 exactly, nothing is clipped, and the
    gradient with respect to the logits equals that of -sum A_i log pi(o_i,t) under the same normalisation."""
    g = torch.Generator().manual_seed(3)
    n, vocab = sum(LENGTHS), 11
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=g)
    _, _, _, adv, doc = _case()
    cfg = LossConfig(loss, 0.2, 0.28, level, 0.0)

    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp = torch.log_softmax(x1, -1).gather(1, labels[:, None]).squeeze(1)
    num, stats = policy_loss(cfg, logp, adv, doc)  # old_logp None: the first pass
    from xtune.methods.grpo_loss import log_importance

    assert (torch.exp(log_importance(logp, logp.detach(), doc, 6, level)) == 1.0).all()
    assert stats[2:].abs().sum() == 0  # no token clipped
    w = normaliser(loss, 6, n, L_MAX)
    (num / w).backward()

    plain = torch.log_softmax(x2, -1).gather(1, labels[:, None]).squeeze(1)
    pg = 0.0
    for i in range(6):
        s = sum(_tokens(plain, i)) * adv[i]
        pg = pg - (s / LENGTHS[i] if loss == "grpo" else s)
    (pg / w).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-10)
    assert math.isfinite(float(x1.grad.abs().sum())) and x1.grad.abs().sum() > 0
