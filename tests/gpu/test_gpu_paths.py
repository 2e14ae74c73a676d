"""GPU paths against their torch fallbacks (the tested reference). Skipped without CUDA.

Run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

import pytest
import torch

from xtune.config.schema import ModelSpec
from xtune.data.types import PackedBatch
from xtune.models import get_adapter
from xtune.models.tiny import QWEN3_TINY
from xtune.ops.attention import resolve_attn
from xtune.ops.loss import linear_cross_entropy, resolve_loss_mode

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_fused_ce_matches_chunked(dtype):
    pytest.importorskip("liger_kernel")
    assert resolve_loss_mode("auto", CUDA) == "liger"
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


def _first_losses(tmp_path, param_dtype):
    import json

    from xtune.config.compose import load_spec
    from xtune.engine import train

    run = tmp_path / param_dtype
    _, spec = load_spec(["recipe=demo", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
                         "train.sample_prompts=[]", f"parallel.param_dtype={param_dtype}", f"train.work_dir={run}",
                         f"data.cache_dir={tmp_path}/cache"])
    train(spec, run)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_bf16_mixed_precision_tracks_fp32_on_gpu(tmp_path):
    """The engine on CUDA with bf16 compute (FSDP2 MixedPrecisionPolicy, fp32 master weights and
    reductions) gives the fp32 run's losses up to bf16 rounding, from the same seed and data."""
    fp32 = _first_losses(tmp_path, "float32")
    bf16 = _first_losses(tmp_path, "bfloat16")
    assert len(fp32) == len(bf16) == 3
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 2e-2 * abs(a), (fp32, bf16)


def test_qlora_on_gpu_keeps_a_4bit_base_and_learns(tmp_path):
    """QLoRA on CUDA with bf16 compute: every adapted base weight is an NF4 tensor on the GPU (about 0.53
    bytes per parameter), the loss falls over a few steps, and the merged export loads in transformers."""
    import json

    from transformers import AutoModelForCausalLM

    from xtune.config.compose import load_spec
    from xtune.engine import train

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
