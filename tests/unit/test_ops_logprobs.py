"""The chunked per-document log-prob sums equal eager log_softmax (values and gradients), and their
extra memory does not grow with the number of tokens x vocab."""

import pytest
import torch

from xtune.data.types import IGNORE_INDEX
from xtune.ops.logprobs import doc_index_of, linear_doc_logprobs


def _case(seed, T=37, H=16, V=53, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.3
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.3] = IGNORE_INDEX
    cu = torch.tensor([0, 5, 17, 18, 30, T], dtype=torch.int32)
    return hidden, weight, labels, cu


def _reference(hidden, weight, labels, cu):
    """Independent: per document, plain log_softmax over full logits, summed over its labelled tokens."""
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = hidden.new_zeros(())
        for i in range(a, b):
            if labels[i] != IGNORE_INDEX:
                s = s + logp[i, labels[i]]
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_doc_logprobs_match_log_softmax(chunk):
    hidden, weight, labels, cu = _case(0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    doc = doc_index_of(cu, len(labels))
    got = linear_doc_logprobs(h1, w1, labels, doc, len(cu) - 1, chunk_size=chunk)
    ref = _reference(h2, w2, labels, cu)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.tensor([0.7, -1.3, 2.0, 0.5, -0.25])  # a different weight per document
    (got * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_eager_mode_matches_and_untrained_tokens_get_no_gradient():
    hidden, weight, labels, cu = _case(1)
    doc = doc_index_of(cu, len(labels))
    h = hidden.clone().requires_grad_()
    eager = linear_doc_logprobs(hidden, weight, labels, doc, 5, mode="eager")
    torch.testing.assert_close(eager, _reference(hidden, weight, labels, cu), atol=1e-5, rtol=1e-5)
    linear_doc_logprobs(h, weight, labels, doc, 5, chunk_size=3).sum().backward()
    assert (h.grad[labels == IGNORE_INDEX] == 0).all() and (h.grad[labels != IGNORE_INDEX] != 0).any()


def test_peak_memory_does_not_grow_with_tokens():
    """Backward recomputes one [chunk, V] buffer at a time: extra allocation stays ~chunk x V, not T x V."""
    import tracemalloc  # noqa: F401  (torch CPU allocations are not traced; measure via the autograd graph)

    V, H = 4096, 32
    weight = torch.randn(V, H) * 0.1
    for T in (256, 2048):
        hidden = torch.randn(T, H, requires_grad=True)
        labels = torch.randint(0, V, (T,))
        cu = torch.tensor([0, T // 2, T], dtype=torch.int32)
        out = linear_doc_logprobs(hidden, weight, labels, doc_index_of(cu, T), 2, chunk_size=64)
        # What autograd keeps between forward and backward: no tensor with T x V elements.
        saved = [t for t in out.grad_fn.saved_tensors]
        assert max(t.numel() for t in saved) <= max(V * H, T * H)
        out.sum().backward()


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_token_logprobs_and_entropy_match_an_independent_computation(chunk):
    """Per-token log-probs (GRPO's input) equal log_softmax of the full logits token by token, with a different
    incoming gradient per token; the entropies equal torch.distributions.Categorical's."""
    from xtune.ops.logprobs import linear_token_logprobs

    hidden, weight, labels, _ = _case(2)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got, ent = linear_token_logprobs(h1, w1, labels, chunk_size=chunk, with_entropy=True)
    logits = h2 @ w2.t()
    rows = [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX]
    ref = torch.stack([torch.log_softmax(logits[i], -1)[labels[i]] for i in rows])
    ref_ent = torch.distributions.Categorical(logits=logits[rows].detach()).entropy()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad
    upstream = torch.linspace(-2.0, 1.5, len(rows))
    (got * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    eager, eager_ent = linear_token_logprobs(hidden, weight, labels, mode="eager", with_entropy=True)
    torch.testing.assert_close(eager, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager_ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert linear_token_logprobs(hidden, weight, labels, chunk_size=chunk)[1] is None
