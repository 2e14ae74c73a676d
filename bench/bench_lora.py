"""Parameter-efficient tuning: xtune full fine-tuning vs xtune LoRA vs xtune QLoRA vs peft's LoRA inside
Hugging Face `Trainer`, on the same model, init, data and optimizer settings (bench_train's harness: each
system in its own process, so its peak RSS is its own; trained tokens/s over the timed steps).

Two shapes:
- `embed`: bench_train's model (hidden 256, 4 layers, the real 151,936-token vocabulary): 96% of its
  parameters are the embedding and head, so adapters save little there.
- `blocks`: hidden 512, 8 layers, intermediate 1536, the 4,096-token tiny tokenizer: 86% of the parameters
  are in the transformer blocks, as in real models; this is where LoRA's memory saving shows.
LoRA: r 16, alpha 32, every linear layer of the blocks (`all-linear`), lr 1e-3 for all systems.
Goals (issue): LoRA peak memory <= 0.6x full fine-tuning; xtune LoRA >= 1.5x peft + HF Trainer trained tok/s.
The blocks shape also measures memory with activation checkpointing on both (AC_SYSTEMS). Where a step's time
goes, per phase and operator, on the same documents: bench/profile_lora.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ARCH, ROW, prepare, summarise  # noqa: E402
from common import ROOT, run_worker  # noqa: E402

R = 16
BLOCKS = dict(ARCH, vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, bos_token_id=None, eos_token_id=None)
SHAPES = {"embed": (None, ARCH), "blocks": (ROOT / "src" / "xtune" / "assets" / "tokenizers" / "qwen3_tiny", BLOCKS)}
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
# peft's all-linear adapts the same layers as xtune's (every linear layer of the blocks; not lm_head).
COUNT_AS = {"peft_hf_trainer": SYSTEMS["xtune_lora"]["overrides"]}


def parameter_counts(prep: dict, overrides) -> tuple:
    """(trainable, total) of the adapted model, counted on a meta-device build (no weights)."""
    import torch

    from bench_train import xtune_spec
    from xtune import tuning
    from xtune.models import get_adapter

    spec = xtune_spec(Path(prep["tok_dir"]), Path(prep["model_dir"]), Path("/tmp"), 1, prep["data_path"],
                      extra=overrides)
    adapter = get_adapter(spec.model)
    with torch.device("meta"):
        model = adapter.build_model(adapter.build_config(), "sdpa")
    if tuning.enabled(spec.peft):
        tuning.inject(model, adapter, spec.peft)
    return tuning.parameter_counts(model)


def run(quick: bool, log=print) -> dict:
    warmup, timed = (1, 2) if quick else (1, 4)
    shapes = {}
    for shape, (tok_dir, arch) in SHAPES.items():
        prep = prepare(quick, tok_dir=tok_dir, arch=arch)
        batch = max(1, round(prep["samples_per_row"]))
        base = dict(prep, steps=warmup + timed, warmup=warmup, batch_size=batch)
        out = {}
        systems = dict(SYSTEMS, **(AC_SYSTEMS if shape == "blocks" else {}))
        for name, extra in systems.items():
            t = time.perf_counter()
            out[name] = summarise(run_worker("bench_train.py", dict(base, **extra), timeout=3600))
            if "error" not in out[name]:
                out[name]["trainable"], out[name]["total"] = parameter_counts(
                    prep, COUNT_AS.get(name, extra.get("overrides", ())))
            log(f"lora[{shape}]: {name} done in {time.perf_counter() - t:.0f}s: "
                + (out[name].get("error") or f"{out[name]['trained_tok_s']:.0f} trained tok/s, "
                   f"peak {out[name]['peak_rss_gb']:.2f} GB, loss {out[name]['loss_first']:.3f} -> "
                   f"{out[name]['loss_last3']:.3f}"))
        ok = all("error" not in s for s in out.values())
        ratios = {}
        if ok:
            full, lora, hf = out["xtune_full"], out["xtune_lora"], out["peft_hf_trainer"]
            ratios = dict(lora_memory_vs_full=lora["peak_rss_gb"] / full["peak_rss_gb"],
                          qlora_memory_vs_full=out["xtune_qlora"]["peak_rss_gb"] / full["peak_rss_gb"],
                          lora_speed_vs_peft_hf=lora["trained_tok_s"] / hf["trained_tok_s"],
                          lora_loss_vs_peft_hf=lora["loss_last3"] - hf["loss_last3"])
            if "xtune_full_ac" in out:
                ratios["lora_memory_vs_full_ac"] = out["xtune_lora_ac"]["peak_rss_gb"] / out["xtune_full_ac"]["peak_rss_gb"]
        shapes[shape] = dict(arch=arch, hf_batch_size=batch, systems=out, ratios=ratios,
                             meets=bool(ratios) and ratios["lora_speed_vs_peft_hf"] >= 1.5
                             and (shape == "embed" or ratios["lora_memory_vs_full"] <= 0.6))
    return dict(config=dict(row=ROW, r=R, warmup_steps=warmup, timed_steps=timed,
                            memory="peak RSS (VmHWM) of each system's own process"),
                shapes=shapes, target=dict(lora_memory_vs_full_max=0.6, lora_speed_vs_peft_hf_min=1.5),
                meets=all(s["meets"] for s in shapes.values()))
