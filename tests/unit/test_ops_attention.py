"""Attention dispatch and document isolation in packed rows, for every backend available on CPU."""

import pytest
import torch

from xtune.config.schema import ModelSpec
from xtune.data.types import PackedBatch
from xtune.errors import XtuneError
from xtune.models import get_adapter
from xtune.models.tiny import QWEN3_TINY
from xtune.ops.attention import block_causal_mask, packed_kwargs
from xtune.parallel.attention import resolve as resolve_attn


def test_resolve_attn_on_cpu():
    assert resolve_attn("auto", "cpu") == "sdpa"
    assert resolve_attn("sdpa", "cpu") == "sdpa"
    assert resolve_attn("eager", "cpu") == "eager"
    with pytest.raises(XtuneError, match="flash"):
        resolve_attn("flash", "cpu")


def test_block_causal_mask_layout():
    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5, torch.float32)[0, 0]
    allowed = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask == 0, allowed)
    assert torch.all(mask[~allowed] == torch.finfo(torch.float32).min)


def test_flash_kwargs_shape():
    batch = _batch(torch.arange(10)[None], [0, 4, 10])
    kw = packed_kwargs(batch, "flash_attention_2")
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["max_length_q"] == 6 and kw["use_cache"] is False


def _batch(ids, cu):
    cu = torch.tensor(cu, dtype=torch.int32)
    lengths = (cu[1:] - cu[:-1]).tolist()
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return PackedBatch(input_ids=ids, labels=ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max(lengths))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_documents_do_not_see_each_other(impl):
    adapter = get_adapter(ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=QWEN3_TINY))
    torch.manual_seed(0)
    model = adapter.build_model(adapter.build_config(), impl)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3000, (1, 24), generator=g)
    cu = [0, 7, 15, 24]
    base, _ = adapter.hidden_states(model, _batch(ids, cu), impl)
    changed = ids.clone()
    changed[0, 7:15] = torch.randint(0, 3000, (8,), generator=g)  # rewrite the middle document
    other, _ = adapter.hidden_states(model, _batch(changed, cu), impl)
    assert torch.equal(base[:7], other[:7])
    assert (base[15:] - other[15:]).abs().max() < 1e-6  # the document after it is unaffected
    assert (base[7:15] - other[7:15]).abs().max() > 1e-3  # (and the change did matter)
