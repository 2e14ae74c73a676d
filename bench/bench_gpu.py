"""GPU only (skipped without CUDA): tokens/s per GPU and MFU of xtune's engine on a Qwen3-shaped model,
Liger's fused CE and flash-attn varlen against the torch fallbacks (chunked CE, sdpa).

Model: Qwen3-0.6B's shape (random init, untied head), bf16 compute with fp32 master weights, packed
4096-token rows of the demo chats, 8 rows per step. MFU counts 6 x (matmul parameters, the
embedding lookup excluded) flops per token and no attention flops, so it is a lower bound; the peak
is the dense bf16 figure of the GPU (BENCH_PEAK_TFLOPS overrides it; unknown GPUs get no MFU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, emit, run_worker, worker_args  # noqa: E402

ARCH = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
ROW = 4096


def matmul_params() -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        m = Qwen3ForCausalLM(Qwen3Config(**ARCH))
    return sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)


def peak_flops() -> float | None:
    import torch

    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(0)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def measured_bf16_flops(n: int = 8192, reps: int = 10) -> float:
    """The roofline measured in this run: a dense n x n x n bf16 matmul (three warm-ups, mean of `reps`)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def work(a: dict) -> dict:
    import xtune.methods
    from xtune.config.compose import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        _, spec = load_spec([
            "recipe=demo", f"model.tokenizer={a['tok_dir']}", "data.eval_datasets=[]",
            f"data.cache_dir={CACHE / 'data'}", f"data.sample_max_length={ROW}",
            f"data.pack_max_length={ROW}",
            "parallel.param_dtype=bfloat16", f"parallel.attn={a['attn']}", f"loss.mode={a['loss']}",
            "train.global_batch_size=8", "train.micro_batch_size=1", f"train.max_steps={a['steps']}",
            "train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.sample_prompts=[]",
            f"train.work_dir={tmp}/run", "logging.tensorboard=false", "logging.progress=plain",
            "sched=constant", "sched.warmup_ratio=0.0", "optim.lr=1e-4",
        ])
        spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, arch=dict(ARCH)))
        xtune.methods.train(spec, Path(tmp) / "run")
        recs = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r][a["warmup"]:]
    t = sum(r["step_time_s"] for r in recs)
    return dict(tok_s=sum(r["tokens_per_s"] * r["step_time_s"] for r in recs) / t,
                memory_gb=max(r["memory_gb"] for r in recs), loss=recs[-1]["loss"])


def run(quick: bool, log=print) -> dict:
    import torch

    if not torch.cuda.is_available():
        log("gpu: skipped (no CUDA)")
        return dict(skipped="no CUDA device")
    from qwen_tok import qwen3_tokenizer_dir

    have_liger = importlib.util.find_spec("liger_kernel") is not None
    have_flash = importlib.util.find_spec("flash_attn") is not None
    flops_per_token, peak, roof = 6 * matmul_params(), peak_flops(), measured_bf16_flops()
    log(f"gpu: measured bf16 matmul roofline {roof / 1e12:.0f} TFLOP/s (datasheet peak {(peak or 0) / 1e12:.0f})")
    warmup, steps = (2, 5) if quick else (3, 13)
    out = {}
    for loss in ("liger", "chunk"):
        for attn in ("flash", "sdpa"):
            name = f"{loss}+{attn}"
            if (loss == "liger" and not have_liger) or (attn == "flash" and not have_flash):
                out[name] = dict(skipped="not installed")
                continue
            r = run_worker("bench_gpu.py", dict(tok_dir=str(qwen3_tokenizer_dir()), loss=loss, attn=attn,
                                                steps=steps, warmup=warmup), 1200)
            if "error" not in r:
                r["mfu"] = r["tok_s"] * flops_per_token / peak if peak else None
                r["roofline_share"] = r["tok_s"] * flops_per_token / roof
            out[name] = r
            log(f"gpu: {name}: "
                + (r.get("error") or f"{r['tok_s']:.0f} tok/s per GPU, MFU {r['mfu'] or 0:.1%}, "
                   f"{r['roofline_share']:.1%} of the measured roofline"))
    base = out.get("chunk+sdpa", {}).get("tok_s")
    for r in out.values():
        if base and "tok_s" in r:
            r["vs_fallback"] = r["tok_s"] / base
    return dict(device=torch.cuda.get_device_name(0), arch=ARCH, row=ROW, flops_per_token=flops_per_token,
                peak_flops=peak, roofline_flops=roof, configs=out)


if __name__ == "__main__":
    emit(work(worker_args()))
