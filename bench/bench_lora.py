"""Parameter-efficient tuning: xtune full fine-tuning vs xtune LoRA vs xtune QLoRA vs peft's LoRA inside
Hugging Face `Trainer`, on the same model, init, data and optimizer settings (bench_train's harness: each
system in its own process, so its peak RSS is its own; trained tokens/s over the timed steps).

Three shapes:
- `embed`: bench_train's model (hidden 256, 4 layers, the real 151,936-token vocabulary): 96% of its
  parameters are the embedding and head, so adapters save little there.
- `blocks`: hidden 512, 8 layers, intermediate 1536, the 4,096-token tiny tokenizer: 86% of the parameters
  are in the transformer blocks, as in real models. At 28M parameters its weights, gradients and Adam
  states (0.45 GB) are smaller than one 2048-token row's activations (~1 GB), so its memory ratio measures
  activations more than what LoRA saves.
- `deep`: hidden 1024, 16 layers, intermediate 2816, 16 heads / 4 KV heads, the tiny tokenizer (185M
  parameters, 96% in the blocks), activation checkpointing on (the usual setting where memory limits a
  run): weights, gradients and optimizer states outweigh activations, as they do for real models (Qwen3-8B:
  ~130 GB of states against a few GB of checkpointed activations). Memory only (one warm-up and one timed
  step of full fine-tuning, LoRA and QLoRA); the speed goal is read on the other two shapes.
LoRA: r 16, alpha 32, every linear layer of the blocks (`all-linear`), lr 1e-3 for all systems.
Goals (issue): LoRA peak memory <= 0.6x full fine-tuning, read on the `deep` shape; xtune LoRA >= 1.5x
peft + HF Trainer trained tok/s on `embed` and `blocks`. Where a step's time goes, per phase and operator,
on the same documents: bench/profile_lora.py. `LORA_SHAPES=deep` (comma-separated) runs only those shapes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ARCH, ROW, prepare, summarise  # noqa: E402
from common import ROOT, run_worker  # noqa: E402

R = 16
BLOCKS = dict(ARCH, vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, bos_token_id=None, eos_token_id=None)
DEEP = dict(BLOCKS, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=4)
TINY_TOK = ROOT / "src" / "xtune" / "assets" / "tokenizers" / "qwen3_tiny"
SYSTEMS = {
    "xtune_full": dict(system="xtune"),
    "xtune_lora": dict(system="xtune", overrides=["peft=lora", f"peft.r={R}", f"peft.alpha={2 * R}",
                                                  "peft.modules_to_save=[]"]),
    "xtune_qlora": dict(system="xtune", overrides=["peft=qlora", f"peft.r={R}", f"peft.alpha={2 * R}",
                                                   "peft.dropout=0.0", "peft.modules_to_save=[]"]),
    "peft_hf_trainer": dict(system="hf", lora_r=R),
}
# Memory with activation checkpointing on both (the usual setting where memory is what limits a run): at
# 2048-token rows the blocks shape's activations (~1 GB) outweigh its weights and Adam states (~0.45 GB), so
# without it the peak RSS ratio says more about activations than about what LoRA saves.
AC = ["parallel.activation_checkpointing=true"]
AC_SYSTEMS = {
    "xtune_full_ac": dict(system="xtune", overrides=AC),
    "xtune_lora_ac": dict(system="xtune", overrides=SYSTEMS["xtune_lora"]["overrides"] + AC),
}
DEEP_SYSTEMS = dict(AC_SYSTEMS, xtune_qlora_ac=dict(system="xtune", overrides=SYSTEMS["xtune_qlora"]["overrides"] + AC))
# glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which a step's
# transient tensors come from its heap and stay there, fragmented: RSS then grows by ~2 GB within one
# forward+backward of the deep shape although the live tensors grow by ~0.4 GB (measured with malloc_trim
# after the step). A fixed threshold (the environment variable; glibc's own knob) maps every block of 128 KiB
# and more and unmaps it on free, so peak RSS follows the memory the training holds, as a GPU's
# max_memory_allocated does. Both are reported; the goal is read on the mapped one. It costs CPU speed
# (page faults on every fresh block), so xtune leaves the allocator alone.
MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
DEEP_SYSTEMS.update({f"{k}_mmap": dict(v, env=MMAP) for k, v in list(DEEP_SYSTEMS.items())})
# shape -> (tokenizer (None: the real Qwen3 one), arch, systems, timed steps (None: the run's default))
SHAPES = {"embed": (None, ARCH, SYSTEMS, None), "blocks": (TINY_TOK, BLOCKS, dict(SYSTEMS, **AC_SYSTEMS), None),
          "deep": (TINY_TOK, DEEP, DEEP_SYSTEMS, 1)}
# peft's all-linear adapts the same layers as xtune's (every linear layer of the blocks; not lm_head).
COUNT_AS = {"peft_hf_trainer": SYSTEMS["xtune_lora"]["overrides"]}


def parameter_counts(prep: dict, overrides) -> tuple:
    """(trainable, total) of the adapted model, counted on a meta-device build (no weights)."""
    import torch
    from bench_train import xtune_spec

    from xtune import peft as xpeft
    from xtune.models import get_adapter

    spec = xtune_spec(Path(prep["tok_dir"]), Path(prep["model_dir"]), Path("/tmp"), 1, prep["data_path"],
                      extra=overrides)
    adapter = get_adapter(spec.model)
    with torch.device("meta"):
        model = adapter.build_model(adapter.build_config(), "sdpa")
    if xpeft.enabled(spec.peft):
        xpeft.inject(model, adapter, spec.peft)
    return xpeft.parameter_counts(model)


def run(quick: bool, log=print) -> dict:
    warmup, timed = (1, 2) if quick else (1, 4)
    shapes = {}
    only = [x for x in os.environ.get("LORA_SHAPES", "").split(",") if x]  # e.g. LORA_SHAPES=deep
    for shape, (tok_dir, arch, systems, shape_timed) in SHAPES.items():
        if only and shape not in only:
            continue
        prep = prepare(quick, tok_dir=tok_dir, arch=arch)
        batch = max(1, round(prep["samples_per_row"]))
        base = dict(prep, steps=warmup + (shape_timed or timed), warmup=warmup, batch_size=batch)
        out = {}
        for name, extra in systems.items():
            t = time.perf_counter()
            args = dict(base, **{k: v for k, v in extra.items() if k != "env"})
            out[name] = summarise(run_worker("bench_train.py", args, timeout=3600, env=extra.get("env")))
            if "error" not in out[name]:
                out[name]["trainable"], out[name]["total"] = parameter_counts(
                    prep, COUNT_AS.get(name, extra.get("overrides", ())))
            log(f"lora[{shape}]: {name} done in {time.perf_counter() - t:.0f}s: "
                + (out[name].get("error") or f"{out[name]['trained_tok_s']:.0f} trained tok/s, "
                   f"peak {out[name]['peak_rss_gb']:.2f} GB, loss {out[name]['loss_first']:.3f} -> "
                   f"{out[name]['loss_last3']:.3f}"))
        ratios = _ratios(out) if all("error" not in s for s in out.values()) else {}
        if not ratios:
            meets = False
        elif shape == "deep":
            meets = ratios["lora_memory_vs_full_ac_mmap"] <= 0.6
        else:
            meets = ratios["lora_speed_vs_peft_hf"] >= 1.5
        shapes[shape] = dict(arch=arch, hf_batch_size=batch, systems=out, ratios=ratios, meets=meets)
    return dict(config=dict(row=ROW, r=R, warmup_steps=warmup, timed_steps=timed,
                            memory="peak RSS (VmHWM) of each system's own process"),
                shapes=shapes, target=dict(lora_memory_vs_full_max=0.6, lora_speed_vs_peft_hf_min=1.5),
                meets=all(s["meets"] for s in shapes.values()))


def _ratios(out: dict) -> dict:
    """Memory against full fine-tuning (plain and with activation checkpointing, where both ran) and speed
    and loss against peft + HF Trainer (where it ran)."""
    ratios = {}
    for suffix in ("", "_ac", "_ac_mmap"):
        full = out.get(f"xtune_full{suffix}")
        for kind in ("lora", "qlora"):
            if full and f"xtune_{kind}{suffix}" in out:
                ratios[f"{kind}_memory_vs_full{suffix}"] = out[f"xtune_{kind}{suffix}"]["peak_rss_gb"] / full["peak_rss_gb"]
    if "peft_hf_trainer" in out:
        lora, hf = out["xtune_lora"], out["peft_hf_trainer"]
        ratios.update(lora_speed_vs_peft_hf=lora["trained_tok_s"] / hf["trained_tok_s"],
                      lora_loss_vs_peft_hf=lora["loss_last3"] - hf["loss_last3"])
    return ratios
