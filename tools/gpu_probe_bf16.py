"""Where does bf16 on CUDA part from fp32? (the first H200 run: the demo's step-1 loss 8.3886 in bf16 vs 8.3118 in
fp32, then a much slower step 1; on CPU the two agree to 1e-5). Prints, on CUDA:

1. plain transformers (no xtune): the demo model's loss on one packed-free batch in fp32 and under bf16 weights,
   from one init -> the model's own bf16 error;
2. xtune's engine: the step-1..3 losses in fp32 and bf16 (FSDP2 mixed precision) for loss.mode=chunk;
3. whether xtune's initial weights are the same in both runs (a bf16 run wraps the model in FSDP2 even on one GPU,
   an fp32 run does not: a difference here means the init, not bf16 arithmetic, moved the loss).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def plain() -> None:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from xtune.models.tiny import QWEN3_TINY

    tok = AutoTokenizer.from_pretrained(ROOT / "src/xtune/assets/tokenizers/qwen3_tiny")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_TINY, use_cache=False)).cuda()
    ids = tok("What is the capital of France? Paris. Sort 7 2 9 4: 2 4 7 9.", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        fp32 = model(input_ids=ids, labels=ids).loss.item()
        bf16 = model.to(torch.bfloat16)(input_ids=ids, labels=ids).loss.item()
    print(f"plain transformers: fp32 {fp32:.5f} bf16 {bf16:.5f}")


def engine() -> None:
    from xtune.config.compose import load_spec
    from xtune.methods import train

    with tempfile.TemporaryDirectory() as tmp:
        init = {}
        for dtype in ("float32", "bfloat16"):
            run = Path(tmp) / dtype
            _, spec = load_spec(["recipe=demo", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
                                 "train.sample_prompts=[]", f"parallel.param_dtype={dtype}", "loss.mode=chunk",
                                 f"train.work_dir={run}", f"data.cache_dir={tmp}/cache", "train.save_every=0",
                                 "peft=lora", "peft.modules_to_save=[]"])
            train(spec, run)  # LoRA: the base never moves and is written once to run/base; step 1 sees B = 0
            losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
            print(f"xtune {dtype}: losses {losses} (step 1 at the initial weights)")
            from safetensors.torch import load_file

            init[dtype] = load_file(str(next((run / "base").glob("*.safetensors"))))
        diffs = {k: (init["float32"][k] - init["bfloat16"][k]).abs().max().item() for k in init["float32"]}
        print("initial weights, largest difference fp32 run vs bf16 run:", max(diffs.values()),
              sorted(diffs.items(), key=lambda kv: -kv[1])[:3])


if __name__ == "__main__":
    plain()
    engine()
