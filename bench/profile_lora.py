"""Where a LoRA step's time goes: xtune (one packed row) vs peft inside a plain HF-style loop (the same
documents, padded to the longest), on bench_lora's `blocks` shape, in one process, steps interleaved.

    python bench/profile_lora.py [--steps 3] [--ops]

Per step: forward, backward, optimizer (clip + AdamW + zero_grad) wall times, and per trained token.
Both sides see the same documents each step (the documents of xtune's packed row), the same init, LoRA
r 16 / alpha 32 / dropout 0 on every linear layer of the blocks, fp32, sdpa. `--ops` adds torch.profiler's
top operators for one step of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_xtune(prep, work_dir, extra=()):
    from bench_lora import R
    from bench_train import xtune_spec

    from xtune.engine.preflight import preflight
    from xtune.engine.trainer import Trainer
    from xtune.methods import get_method
    from xtune.models import get_adapter

    overrides = ["peft=lora", f"peft.r={R}", f"peft.alpha={2 * R}", "peft.modules_to_save=[]", *extra]
    spec = xtune_spec(Path(prep["tok_dir"]), Path(prep["model_dir"]), work_dir, 100, prep["data_path"],
                      extra=overrides)
    adapter = get_adapter(spec.model)
    tok = preflight(spec, adapter, work_dir)
    return Trainer(spec, work_dir, method=get_method(spec), adapter=adapter, tokenizer=tok)


def build_hf(prep):
    import torch
    from bench_lora import R
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(prep["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    # HF Trainer's default optimizer on CPU: torch AdamW (foreach), betas/eps/lr as bench_train.
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    return model, params, opt


def hf_batch(mb, tok):
    """The documents of xtune's packed row as an HF padded batch (labels unshifted, as transformers wants)."""
    from transformers import DataCollatorForSeq2Seq

    cu = mb.cu_seqlens.tolist()
    ids, labels = mb.input_ids[0].tolist(), mb.labels[0].tolist()
    feats = []
    for s, e in zip(cu[:-1], cu[1:]):
        feats.append({"input_ids": ids[s:e], "attention_mask": [1] * (e - s), "labels": [-100] + labels[s:e - 1]})
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(feats)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def xtune_step(tr, mb):
    import torch

    w = float(tr.method.normaliser(mb))
    (loss_sum, _, _), f = timed(lambda: tr.method.forward(tr.root, mb))
    loss = loss_sum.float() / w
    _, b = timed(lambda: loss.backward())
    _, o = timed(tr.optimizer_step)
    torch.manual_seed(0)
    return dict(forward=f, backward=b, optimizer=o, loss=float(loss.detach()))


def hf_step(model, params, opt, batch):
    import torch

    out, f = timed(lambda: model(**batch))
    _, b = timed(lambda: out.loss.backward())

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _, o = timed(step)
    return dict(forward=f, backward=b, optimizer=o, loss=float(out.loss.detach()))


def ops_table(fn, n=14):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main():
    import os

    import torch
    from bench_lora import BLOCKS, SHAPES
    from bench_train import prepare
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ops", action="store_true")
    p.add_argument("--xtune", nargs="*", default=[], help="extra xtune overrides")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    prep = prepare(True, tok_dir=SHAPES["blocks"][0], arch=BLOCKS)
    tok = AutoTokenizer.from_pretrained(prep["tok_dir"])
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_xtune(prep, Path(tmp) / "run", a.xtune)
        model, params, opt = build_hf(prep)
        print(f"load {os.getloadavg()}; threads {torch.get_num_threads()}")
        rows = []
        for step in range(a.steps + 1):
            mb = next(tr.loader)[0]
            batch = hf_batch(mb, tok)
            trained = int(mb.num_trained)
            x = xtune_step(tr, mb)
            h = hf_step(model, params, opt, batch)
            if step == 0:
                print(f"row: {mb.num_tokens} tokens, {mb.cu_seqlens.numel() - 1} docs, {trained} trained; "
                      f"HF batch {tuple(batch['input_ids'].shape)} = {batch['input_ids'].numel()} tokens "
                      f"({int(batch['attention_mask'].sum())} real)")
                continue  # warm-up
            rows.append((x, h, trained))
            print(f"step {step}: xtune " + " ".join(f"{k} {v:.3f}" for k, v in x.items())
                  + " | hf " + " ".join(f"{k} {v:.3f}" for k, v in h.items()))
        for name, i in (("xtune", 0), ("hf", 1)):
            tot = {k: sum(r[i][k] for r in rows) for k in ("forward", "backward", "optimizer")}
            tok_s = sum(r[2] for r in rows) / sum(tot.values())
            print(f"{name:6s} " + " ".join(f"{k} {v / len(rows):.3f}s" for k, v in tot.items())
                  + f"  -> {tok_s:.0f} trained tok/s")
        xs = sum(sum(r[0][k] for k in ("forward", "backward", "optimizer")) for r in rows)
        hs = sum(sum(r[1][k] for k in ("forward", "backward", "optimizer")) for r in rows)
        print(f"xtune / hf speed (same documents): {hs / xs:.2f}x; load {os.getloadavg()}")
        if a.ops:
            mb = next(tr.loader)[0]
            batch = hf_batch(mb, tok)
            print("== xtune ops\n" + ops_table(lambda: xtune_step(tr, mb)))
            print("== hf ops\n" + ops_table(lambda: hf_step(model, params, opt, batch)))


if __name__ == "__main__":
    main()
