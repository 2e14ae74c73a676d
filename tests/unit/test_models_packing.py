"""Invariant 1: a packed row of documents gives the same per-token losses and the same gradients (wrt
every parameter) as the documents run one by one through the plain transformers model."""

import pytest
import torch
import torch.nn.functional as F

from xtune.config.schema import ModelSpec
from xtune.data.types import PackedBatch
from xtune.models import get_adapter
from xtune.models.tiny import INTERN_S1_TINY, QWEN3_MOE_TINY, QWEN3_TINY
from xtune.ops.loss import linear_cross_entropy

TOL = 1e-5
SPECS = {
    "qwen3": ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=QWEN3_TINY),
    "qwen3_moe": ModelSpec(family="qwen3_moe", tokenizer="builtin:qwen3_tiny", arch=QWEN3_MOE_TINY),
    "intern_s1": ModelSpec(family="intern_s1", tokenizer="builtin:intern_s1_tiny", arch=INTERN_S1_TINY,
                           image_size=56, tokens_per_tile=4),
}


def _doc(g, n, image_tokens=0, image_id=None):
    ids = torch.randint(0, 3000, (n,), generator=g)
    if image_tokens:
        ids = torch.cat([ids[:3], torch.full((image_tokens,), image_id), ids[3:]])
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    labels[: len(ids) // 3] = -100  # an untrained prompt
    labels[ids == image_id] = -100
    return ids, labels


def _pack(docs, pixel_values=None):
    ids = torch.cat([d[0] for d in docs])[None]
    labels = torch.cat([d[1] for d in docs])[None]
    lengths = [len(d[0]) for d in docs]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return PackedBatch(input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=cu, max_seqlen=max(lengths),
                       pixel_values=pixel_values)


def _grads(model):
    out = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _reference(model, docs, pixel_values):
    """Each document alone through the unmodified transformers forward; torch's cross_entropy."""
    per_token, total = [], 0.0
    for i, (ids, labels) in enumerate(docs):
        extra = {"pixel_values": pixel_values} if (pixel_values is not None and i == 1) else {}
        logits = model(input_ids=ids[None], use_cache=False, **extra).logits[0]
        ce = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
        per_token.append(ce)
        total = total + ce.sum()
    total.backward()
    return torch.cat(per_token), _grads(model)


def _packed(adapter, model, batch, impl):
    hidden, aux = adapter.hidden_states(model, batch, impl)
    weight = adapter.output_weight(model)
    labels = batch.labels[0]
    with torch.no_grad():
        per_token = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    linear_cross_entropy(hidden, weight, labels, mode="chunk", chunk_size=8).backward()
    return per_token, _grads(model), aux


def _compare(ref, got, expect_zero=()):
    per_ref, grads_ref = ref
    per_got, grads_got = got
    assert (per_ref - per_got).abs().max().item() <= TOL
    for name, g_ref in grads_ref.items():
        g_got = grads_got[name]
        if g_ref is None:
            assert g_got is None or g_got.abs().max() == 0 or any(name.startswith(p) for p in expect_zero), name
            continue
        assert g_got is not None, name
        assert (g_ref - g_got).abs().max().item() <= TOL, name


def _setup(family, impl, spec=None):
    adapter = get_adapter(spec or SPECS[family])
    torch.manual_seed(0)
    model = adapter.build_model(adapter.build_config(), impl)
    return adapter, model


def _reference_aux(model, docs):
    """The router load-balancing loss over the tokens of all documents, each run alone through transformers'
    model (its router logits per layer, concatenated over the documents), times the config's coefficient."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    with torch.no_grad():
        per_doc = [model(input_ids=ids[None], use_cache=False, output_router_logits=True).router_logits
                   for ids, _ in docs]
    layers = tuple(torch.cat(layer) for layer in zip(*per_doc))
    cfg = model.config
    return cfg.router_aux_loss_coef * load_balancing_loss_func(layers, cfg.num_experts, cfg.num_experts_per_tok)


@pytest.mark.parametrize("family,impl", [("qwen3", "sdpa"), ("qwen3", "eager"), ("qwen3_moe", "sdpa"),
                                         ("qwen3_moe", "eager")])
def test_packed_equals_unpacked_text(family, impl):
    adapter, model = _setup(family, impl)
    g = torch.Generator().manual_seed(1)
    docs = [_doc(g, 9), _doc(g, 14), _doc(g, 11)]
    ref = _reference(model, docs, None)
    per_token, grads, aux = _packed(adapter, model, _pack(docs), impl)
    _compare(ref, (per_token, grads))
    if family == "qwen3_moe":  # router load-balancing loss over the packed tokens
        expected = _reference_aux(model, docs)
        assert expected > 0 and abs(aux.item() - expected.item()) <= TOL, (aux, expected)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_unpacked_vlm_with_image(impl):
    adapter, model = _setup("intern_s1", impl)
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 3, 56, 56, generator=g)  # 2 tiles -> 2 x 4 image tokens
    docs = [_doc(g, 9), _doc(g, 10, image_tokens=8, image_id=cfg.image_token_id), _doc(g, 11)]
    ref = _reference(model, docs, pixel_values)
    per_token, grads, _ = _packed(adapter, model, _pack(docs, pixel_values), impl)
    _compare(ref, (per_token, grads))
    assert grads["model.vision_tower.encoder.layer.0.mlp.fc1.weight"].abs().max() > 0


def test_vlm_batch_without_image_runs_vision_tower_with_zero_effect():
    adapter, model = _setup("intern_s1", "sdpa")
    g = torch.Generator().manual_seed(3)
    docs = [_doc(g, 9), _doc(g, 12)]
    ref = _reference(model, docs, None)  # the text model alone: vision params get no gradient at all
    per_token, grads, _ = _packed(adapter, model, _pack(docs), "sdpa")
    _compare(ref, (per_token, grads))
    vision = {n: gr for n, gr in grads.items() if n.startswith(("model.vision_tower", "model.multi_modal_projector"))}
    # The blank tile ran (every vision parameter is in the graph, as FSDP2 needs) but changed nothing.
    assert vision and all(gr is not None and gr.abs().max() == 0 for gr in vision.values())


def _check_per_document_sdpa(adapter, model, docs, pixel_values=None):
    """The unpacked reference, then the same model switched to ops/packed_sdpa (one SDPA call per document)
    fed the packed row: the same per-token losses and gradients."""
    from xtune.ops import packed_sdpa

    ref = _reference(model, docs, pixel_values)
    assert packed_sdpa.use_on(adapter.language_model(model), "sdpa")
    per_token, grads, _ = _packed(adapter, model, _pack(docs, pixel_values), packed_sdpa.NAME)
    _compare(ref, (per_token, grads))


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_per_document_sdpa_equals_unpacked(family):
    adapter, model = _setup(family, "sdpa")
    g = torch.Generator().manual_seed(4)
    docs = [_doc(g, 9), _doc(g, 1), _doc(g, 14), _doc(g, 11)]  # (a one-token document too)
    _check_per_document_sdpa(adapter, model, docs)


def test_per_document_sdpa_equals_unpacked_vlm_with_image():
    adapter, model = _setup("intern_s1", "sdpa")
    g = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(2, 3, 56, 56, generator=g)
    docs = [_doc(g, 9), _doc(g, 10, image_tokens=8, image_id=model.config.image_token_id), _doc(g, 11)]
    _check_per_document_sdpa(adapter, model, docs, pixel_values)


def test_per_document_sdpa_keeps_sliding_windows():
    """Documents longer than the window get the banded mask transformers' own sdpa uses (all layers sliding)."""
    arch = dict(QWEN3_TINY, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    adapter, model = _setup("qwen3", "sdpa", ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=arch))
    assert set(model.config.layer_types) == {"sliding_attention"}
    g = torch.Generator().manual_seed(6)
    docs = [_doc(g, 12), _doc(g, 3), _doc(g, 9)]
    _check_per_document_sdpa(adapter, model, docs)


def test_per_document_sdpa_model_called_directly_keeps_padding():
    """The switched model used without packed kwargs (tests, probes): padded rows as transformers' sdpa gives."""
    from xtune.ops import packed_sdpa

    adapter, model = _setup("qwen3", "sdpa")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 3000, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert packed_sdpa.use_on(adapter.language_model(model), "sdpa")
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[0], want[0], atol=TOL, rtol=0)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], atol=TOL, rtol=0)
