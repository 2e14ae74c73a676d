"""`parallel.compile`: each transformer block compiled (inductor, the system C++ compiler on CPU) equals eager in loss
and gradients, and packed rows of new lengths and document layouts do not recompile."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from xtune.config.schema import LossSpec, ModelSpec
from xtune.data.types import PackedBatch
from xtune.methods.sft_objective import LossModel
from xtune.models import get_adapter
from xtune.models.tiny import QWEN3_TINY
from xtune.parallel import attention
from xtune.parallel.fsdp import compile_blocks


def _batch(g: torch.Generator, vocab: int) -> PackedBatch:
    lengths = torch.randint(5, 60, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    labels = torch.full_like(ids, -100)
    start = 0
    for n in lengths:
        labels[start: start + n - 1] = ids[start + 1: start + n]
        start += n
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return PackedBatch(input_ids=ids[None], labels=labels[None], position_ids=pos[None], cu_seqlens=cu,
                       max_seqlen=max(lengths))


def _root(model, adapter):
    impl = attention.switch(adapter.language_model(model), "sdpa")
    return LossModel(model, adapter, impl, LossSpec(), "chunk")


def test_compiled_blocks_equal_eager_and_new_packings_do_not_recompile():
    adapter = get_adapter(ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=QWEN3_TINY))
    torch.manual_seed(0)
    model = adapter.build_model(adapter.build_config(), "sdpa")
    eager, compiled = _root(copy.deepcopy(model), adapter), _root(model, adapter)
    blocks = list(adapter.blocks(compiled.model))
    compile_blocks(blocks)
    traced = []  # a hook inside a block runs under dynamo's tracing only if the block really is compiled
    blocks[0].mlp.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    g = torch.Generator().manual_seed(1)
    vocab = compiled.model.config.vocab_size

    def step(batch):
        out = []
        for root in (eager, compiled):
            root.zero_grad()
            loss, _ = root(batch)
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in root.model.named_parameters()}))
        (le, ge), (lc, gc) = out
        assert torch.allclose(le, lc, rtol=1e-5, atol=1e-5), (le, lc)
        for n in ge:  # fp32 tolerance relative to the tensor's largest gradient (fused kernels reorder sums)
            assert (ge[n] - gc[n]).abs().max() <= 1e-4 * ge[n].abs().max() + 1e-8, (n, (ge[n] - gc[n]).abs().max())

    for _ in range(2):  # the first shape compiles; at most one more compile may follow before it is dynamic
        step(_batch(g, vocab))
    with torch.compiler.set_stance("fail_on_recompile"):  # raises on any recompilation
        lengths = set()
        for _ in range(20):
            batch = _batch(g, vocab)
            lengths.add(batch.num_tokens)
            step(batch)
    assert len(lengths) > 10  # the rows really had new lengths and layouts
    assert any(traced)


def _losses(tmp_path, name, extra):
    from xtune.config.compose import load_spec
    from xtune.methods import train

    run = tmp_path / name
    _, spec = load_spec(["recipe=demo", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
                         "train.save_every=0", "train.sample_prompts=[]", f"train.work_dir={run}",
                         f"data.cache_dir={tmp_path}/cache", "peft=lora", "parallel.activation_checkpointing=true",
                         *extra])
    train(spec, run)
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_engine_with_compile_lora_and_checkpointing_trains_like_eager(tmp_path):
    """Through the engine: LoRA, activation checkpointing and packed demo rows; same per-step losses as eager."""
    eager = _losses(tmp_path, "eager", [])
    compiled = _losses(tmp_path, "compiled", ["parallel.compile=true"])
    assert len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-5)
