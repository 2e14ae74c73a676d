"""Chunked linear cross-entropy: equal to the eager reference, and its memory does not grow with T x V."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from xtune.errors import XtuneError
from xtune.ops.loss import linear_cross_entropy, resolve_loss_mode


def _reference(hidden, weight, labels, token_weights):
    # Independent of xtune: full logits + torch's own cross_entropy.
    ce = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    return (ce if token_weights is None else ce * token_weights).sum()


def _loss_and_grads(fn, hidden, weight, *args, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fn(h, w, *args, **kw)
    (loss * 1.7).backward()  # a non-unit upstream gradient must be propagated too
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunk_equals_eager(chunk_size, weighted):
    g = torch.Generator().manual_seed(0)
    T, H, V = 53, 24, 101
    hidden, weight = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (T,), generator=g)
    labels[:20] = -100  # whole chunks with no trained token
    labels[30:33] = -100
    token_weights = torch.rand(T, generator=g) if weighted else None
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, token_weights, mode="chunk", chunk_size=chunk_size)
    ref = _loss_and_grads(_reference, hidden, weight, labels, token_weights)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert got[1][:20].abs().max() == 0  # untrained tokens get no gradient


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight = torch.randn(9, 8), torch.randn(30, 8)
    labels = torch.full((9,), -100)
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, None, mode="chunk", chunk_size=4)
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_eager_mode_matches_reference():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(12, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (12,), generator=g)
    got = linear_cross_entropy(hidden, weight, labels, mode="eager")
    assert torch.allclose(got, _reference(hidden, weight, labels, None), atol=1e-5)


def test_bf16_inputs_use_fp32_math():
    g = torch.Generator().manual_seed(2)
    T, H, V = 40, 32, 300
    hidden, weight = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g) * 0.2
    labels = torch.randint(0, V, (T,), generator=g)
    got = _loss_and_grads(linear_cross_entropy, hidden.bfloat16(), weight.bfloat16(), labels, None, mode="chunk", chunk_size=16)
    ref = _loss_and_grads(_reference, hidden.bfloat16().float(), weight.bfloat16().float(), labels, None)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert abs(got[0].item() - ref[0].item()) / ref[0].item() < 1e-2
    for a, b in zip(got[1:], ref[1:]):
        assert (a.float() - b).abs().max().item() < 2e-2 * b.abs().max().item()


def test_resolve_loss_mode_on_cpu():
    assert resolve_loss_mode("auto", "cpu") == "chunk"
    assert resolve_loss_mode("eager", "cpu") == "eager"
    with pytest.raises(XtuneError, match="CUDA"):
        resolve_loss_mode("liger", "cpu")
    with pytest.raises(XtuneError):
        resolve_loss_mode("fast", "cpu")


# ------------------------------------------------------------------ memory
class _PeakTensorMemory(TorchDispatchMode):
    """Tracks bytes of tensor storages created by aten ops while active (forward and CPU backward),
    freeing them when the storage dies: a deterministic peak, unlike RSS with a caching malloc."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)
        return out


def _peak_mib(T, mode, V=32768, H=32, chunk_size=128):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
    labels = torch.randint(0, V, (T,), generator=g)
    with _PeakTensorMemory() as tracker:
        linear_cross_entropy(hidden, weight, labels, mode=mode, chunk_size=chunk_size).backward()
    return tracker.peak / 2**20


def test_chunk_peak_memory_is_flat_in_tokens():
    small, large = _peak_mib(512, "chunk"), _peak_mib(4096, "chunk")
    eager = _peak_mib(2048, "eager")
    # eager holds [T, V] fp32 logits (256 MiB at T=2048) plus their gradient: the tracker must see it.
    assert eager > 512, eager
    # chunked: one [128, V] fp32 buffer (16 MiB) + [V, H] fp32 grad accumulator (4 MiB) + the [V, H]
    # weight gradient (4 MiB), whatever T is; only the [T, H] hidden gradient grows (0.5 MiB here).
    assert large < 32, large
    assert large - small < 1, (small, large)
