"""GPU paths against their torch fallbacks (the tested reference). Skipped without CUDA.

Run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

import pytest
import torch

from xtune.config.schema import ModelSpec
from xtune.data.types import PackedBatch
from xtune.models import get_adapter
from xtune.models.tiny import QWEN3_TINY
from xtune.ops.loss import linear_cross_entropy, resolve_loss_mode
from xtune.parallel.attention import resolve as resolve_attn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")


def _packed_batch(g, lengths, vocab=3000):
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    labels = torch.full_like(ids, -100)
    start = 0
    for n in lengths:  # shifted inside each document, last position untrained
        labels[start: start + n - 1] = ids[start + 1: start + n]
        start += n
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return PackedBatch(input_ids=ids[None], labels=labels[None], position_ids=pos[None], cu_seqlens=cu,
                       max_seqlen=max(lengths))


def _per_document_reference(q, k, v, lengths, window=None):
    """fp32 causal attention of each document alone (sdpa), the reference for the varlen kernel. [1, H, T, D] in."""
    import torch.nn.functional as F

    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[:, :, start:start + n].float() for t in (q, k, v))
        i = torch.arange(n, device=q.device)
        allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, enable_gqa=True))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)  # [1, T, H, D]


@pytest.mark.parametrize("window", [None, 128])
def test_varlen_kernel_matches_per_document_sdpa(window):
    """The packed row's one varlen call (CUDA, bf16, grouped KV heads) equals each document's own causal
    attention, forward and backward, with and without a sliding window."""
    from xtune.ops import packed_sdpa

    g = torch.Generator().manual_seed(2)
    lengths, heads, kv, dim = [300, 517, 211], 8, 2, 128
    T = sum(lengths)
    q, k, v = ((torch.randn(1, h, T, dim, generator=g)).to(CUDA, torch.bfloat16).requires_grad_()
               for h in (heads, kv, kv))
    assert packed_sdpa.varlen_applies(q)
    cu = torch.tensor([0, 300, 817, 1028], device=CUDA)
    got = packed_sdpa.varlen_forward(q, k, v, cu, max(lengths), dim ** -0.5, window)
    ref = _per_document_reference(q, k, v, lengths, window)
    assert got.shape == ref.shape
    assert (got.float() - ref).abs().max() < 2e-2
    w = torch.randn(ref.shape, generator=g).to(CUDA)
    grads = torch.autograd.grad((got.float() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert (a.float() - b.float()).abs().max() < 5e-2 * b.float().abs().max()


def test_training_sdpa_path_isolates_documents_on_cuda():
    """The engine's sdpa path on CUDA bf16 (the varlen kernel): a document's hidden states inside a packed row equal
    the document run alone."""
    from xtune.ops import packed_sdpa

    adapter = get_adapter(ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=QWEN3_TINY, dtype="bfloat16"))
    lengths = [300, 517, 211]
    batch = _packed_batch(torch.Generator().manual_seed(1), lengths).to(CUDA)
    last = PackedBatch(input_ids=batch.input_ids[:, -211:], labels=batch.labels[:, -211:],
                       position_ids=torch.arange(211, device=CUDA)[None],
                       cu_seqlens=torch.tensor([0, 211], dtype=torch.int32, device=CUDA), max_seqlen=211)
    torch.manual_seed(0)
    model = adapter.build_model(adapter.build_config(), "sdpa").to(CUDA)
    assert packed_sdpa.use_on(adapter.language_model(model), "sdpa")
    with torch.no_grad():
        packed, _ = adapter.hidden_states(model, batch, packed_sdpa.NAME)
        alone, _ = adapter.hidden_states(model, last, packed_sdpa.NAME)
    assert torch.allclose(alone.float(), packed[-211:].float(), atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_fused_ce_matches_chunked(dtype):
    pytest.importorskip("liger_kernel")
    assert resolve_loss_mode("auto", CUDA) == "chunk" and resolve_loss_mode("liger", CUDA) == "liger"
    g = torch.Generator().manual_seed(0)
    T, H, V = 2048, 512, 151936
    hidden = (torch.randn(T, H, generator=g) * 0.5).to(CUDA, dtype)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(CUDA, dtype)
    labels = torch.randint(0, V, (T,), generator=g).to(CUDA)
    labels[: T // 3] = -100
    results = {}
    for mode in ("chunk", "liger"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, labels, mode=mode, chunk_size=1024)
        loss.backward()
        results[mode] = (loss.float(), h.grad.float(), w.grad.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    # the mean loss over ~1,400 tokens: bf16 rounding averages out, a bias does not
    assert abs(results["chunk"][0] - results["liger"][0]) <= (1e-5 if dtype == torch.float32 else 2e-3) * results["chunk"][0]
    for ref, got in zip(results["chunk"], results["liger"]):
        assert torch.allclose(ref, got, rtol=tol, atol=tol), (ref - got).abs().max()


def test_flash_varlen_isolates_documents_like_sdpa():
    pytest.importorskip("flash_attn")
    assert resolve_attn("auto", CUDA) == "flash_attention_2"
    adapter = get_adapter(ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=QWEN3_TINY, dtype="bfloat16"))
    lengths = [300, 517, 211]
    batch = _packed_batch(torch.Generator().manual_seed(1), lengths).to(CUDA)
    last = PackedBatch(input_ids=batch.input_ids[:, -211:], labels=batch.labels[:, -211:],
                       position_ids=torch.arange(211, device=CUDA)[None],
                       cu_seqlens=torch.tensor([0, 211], dtype=torch.int32, device=CUDA), max_seqlen=211)
    hidden = {}
    for impl in ("sdpa", "flash_attention_2"):
        torch.manual_seed(0)
        model = adapter.build_model(adapter.build_config(), impl).to(CUDA)
        with torch.no_grad():
            hidden[impl], _ = adapter.hidden_states(model, batch, impl)
            alone, _ = adapter.hidden_states(model, last, impl)
        # Isolation: the last document alone gives the states it has inside the packed row.
        assert torch.allclose(alone.float(), hidden[impl][-211:].float(), atol=2e-2)
    assert torch.allclose(hidden["sdpa"].float(), hidden["flash_attention_2"].float(), atol=5e-2)


def _first_losses(tmp_path, param_dtype, loss_mode="auto"):
    import json

    from xtune.config.compose import load_spec
    from xtune.methods import train

    run = tmp_path / f"{param_dtype}-{loss_mode}"
    _, spec = load_spec(["recipe=demo", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
                         "train.sample_prompts=[]", f"parallel.param_dtype={param_dtype}", f"train.work_dir={run}",
                         f"loss.mode={loss_mode}",
                         f"data.cache_dir={tmp_path}/cache"])
    train(spec, run)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("loss_mode", ["chunk", "liger"])
def test_bf16_mixed_precision_tracks_fp32_on_gpu(tmp_path, loss_mode):
    """The engine on CUDA with bf16 compute (FSDP2 MixedPrecisionPolicy, fp32 master weights and
    reductions) gives the fp32 run's losses up to bf16 rounding, from the same seed and data."""
    if loss_mode == "liger":
        pytest.importorskip("liger_kernel")
    fp32 = _first_losses(tmp_path, "float32", loss_mode)
    bf16 = _first_losses(tmp_path, "bfloat16", loss_mode)
    print(f"{loss_mode}: fp32 {fp32} bf16 {bf16}")
    assert len(fp32) == len(bf16) == 3
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 2e-2 * abs(a), (fp32, bf16)


def test_qlora_on_gpu_keeps_a_4bit_base_and_learns(tmp_path):
    """QLoRA on CUDA with bf16 compute: every adapted base weight is an NF4 tensor on the GPU (about 0.53
    bytes per parameter), the loss falls over a few steps, and the merged export loads in transformers."""
    import json

    from transformers import AutoModelForCausalLM

    from xtune.config.compose import load_spec
    from xtune.methods import train

    run = tmp_path / "qlora"
    _, spec = load_spec(["recipe=demo", "peft=qlora", "peft.r=16", "peft.alpha=32", "peft.dropout=0.0",
                         "train.max_steps=20", "train.log_every=1", "train.eval_every=0", "train.sample_prompts=[]",
                         "parallel.param_dtype=bfloat16", "optim.lr=3e-3", f"train.work_dir={run}",
                         f"data.cache_dir={tmp_path}/cache"])
    train(spec, run)
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(losses) == 20 and losses[-1] < losses[0] - 1.0, losses
    merged = AutoModelForCausalLM.from_pretrained(str(run / "hf")).to(CUDA)
    ids = torch.randint(0, 3000, (1, 32), device=CUDA)
    assert torch.isfinite(merged(input_ids=ids).logits).all()
    assert (run / "hf_adapter" / "adapter_model.safetensors").is_file()
