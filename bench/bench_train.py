"""Training throughput: xtune's engine vs Hugging Face `Trainer` (padding) vs TRL `SFTTrainer` (packing).

All three train the same tiny Qwen3 (hidden 256, 4 layers, the real 151,936-token vocabulary) from
the same saved random init, in fp32 on CPU, on the same tokenised samples (the bundled demo chats,
rendered with Qwen3's chat template by xtune's data stage; assistant-only labels), with the same
AdamW settings, constant LR and clipping. Each runs in its own process (so its peak RSS is its own).

- xtune: `xtune.methods.train` (soft packing into 2048-token rows, one row per step, chunked CE);
  tokens/s from its metrics.jsonl (`step_time_s` covers forward, backward and the optimizer step).
- HF Trainer: `DataCollatorForSeq2Seq` padding to the longest sample of the batch; the batch holds
  as many samples as an xtune row does on average, so every system sees about as many samples a step.
- TRL SFTTrainer: `packing=True` (TRL's best-fit-decreasing, padding-free) into 2048-token rows, one per step.

Baseline step times run from `on_step_begin` to `on_step_end` (forward, backward, optimizer step; the
batch is already collated), the same span as xtune's `step_time_s`. The first `warmup` steps are
not timed. Throughput counts trained tokens (labels != -100); a padded batch also costs pad tokens.
Losses: step 1 (same weights, so all ~ln(vocab)) and the mean of the last 3 steps.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, emit, peak_rss_mb, run_worker, worker_args  # noqa: E402

ARCH = dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)
ROW = 2048
LR = 1e-3
SEED = 42


def init_model_dir(arch: dict = ARCH) -> Path:
    """One random init, saved once and loaded by every system."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = CACHE / f"qwen3_h{arch['hidden_size']}_l{arch['num_hidden_layers']}_v{arch['vocab_size']}_init"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(**arch))
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def xtune_spec(tok_dir: Path, model_dir: Path, work_dir: Path, steps: int, data_path: str, family: str = "qwen3",
               extra=()):
    from xtune.config.compose import load_spec

    _, spec = load_spec([f"model.family={family}", *extra,
        "recipe=demo", f"model.load_from={model_dir}", f"model.tokenizer={tok_dir}",
        f"data.datasets.0.path={data_path}", "data.eval_datasets=[]", f"data.cache_dir={CACHE / 'data'}",
        f"data.sample_max_length={ROW}", f"data.pack_max_length={ROW}", "data.pack=soft",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.betas=[0.9,0.95]", "optim.max_grad_norm=1.0",
        "sched=constant", "sched.warmup_ratio=0.0",
        "loss.mode=chunk", "loss.chunk_size=1024", "parallel.attn=sdpa", "parallel.param_dtype=float32",
        "train.global_batch_size=1", "train.micro_batch_size=1", f"train.max_steps={steps}",
        f"train.seed={SEED}",
        "train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.sample_prompts=[]",
        f"train.work_dir={work_dir}", "logging.tensorboard=false", "logging.progress=plain",
    ])
    # The demo recipe's tiny arch would override the saved config: use the saved one as it is.
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, arch={}))


def prepare(quick: bool, tok_dir: Path | None = None, arch: dict = ARCH) -> dict:
    """Tokenise once with xtune's data stage (warms its cache) and write the samples for the baselines.
    Default: the real Qwen3 tokenizer and the bench model; bench_lora also runs a block-heavy shape."""
    from transformers import AutoTokenizer

    from xtune.data.dataset import load_dataset
    from xtune.data.pack import efficiency, pack

    if tok_dir is None:
        from qwen_tok import qwen3_tokenizer_dir

        tok_dir = qwen3_tokenizer_dir()
    model_dir = init_model_dir(arch)
    data_path = str(ROOT / "src" / "xtune" / "assets" / "demo" / "train.jsonl")
    spec = xtune_spec(tok_dir, model_dir, Path(tempfile.gettempdir()), 1, data_path)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ds = load_dataset(spec.data.datasets[0], tok, spec.data, spec.model, verbose=False)
    samples = []
    for i in range(len(ds)):
        s = ds.sample(i)
        # xtune's labels are shifted (labels[i] = target of position i); transformers shifts itself.
        samples.append({"input_ids": s.input_ids, "labels": [-100] + s.labels[:-1]})
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack("soft", lengths, ROW)
    path = CACHE / f"train_samples_{Path(tok_dir).name}.json"
    path.write_text(json.dumps(samples))
    return dict(tok_dir=str(tok_dir), model_dir=str(model_dir), data_path=data_path, samples_path=str(path),
                samples=len(samples), tokens=sum(lengths), samples_per_row=len(samples) / len(rows),
                xtune_row_efficiency=efficiency(rows, ROW))


# -- workers (each in its own process) --------------------------------------------------------------
def work_xtune(a: dict) -> dict:
    import xtune.methods

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        spec = xtune_spec(Path(a["tok_dir"]), Path(a["model_dir"]), run_dir, a["steps"], a["data_path"],
                          a.get("family", "qwen3"), a.get("overrides", ()))
        xtune.methods.train(spec, run_dir)
        recs = train_records(run_dir)
    return dict(step_stats(recs, a["warmup"]), peak_rss_mb=peak_rss_mb())


def train_records(run_dir: Path) -> list:
    """The training steps' records of an xtune run's metrics.jsonl."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def step_stats(recs: list, warmup: int) -> dict:
    """Losses of every step; seconds, trained and all tokens of the steps after `warmup`."""
    timed = recs[warmup:]
    return dict(
        losses=[r["loss"] for r in recs],
        step_s=[r["step_time_s"] for r in timed],
        trained=[round(r["trained_tokens_per_s"] * r["step_time_s"]) for r in timed],
        tokens=[round(r["tokens_per_s"] * r["step_time_s"]) for r in timed],
    )


def step_clock(times: list):
    """A Trainer callback class appending each step's on_step_begin .. on_step_end seconds to `times`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    return Clock


def _hf_run(a: dict, trl: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(a["tok_dir"])
    model = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    if a.get("lora_r"):  # bench_lora's baseline: peft's LoRA inside HF Trainer
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=a["lora_r"], lora_alpha=2 * a["lora_r"], target_modules="all-linear"))
    samples = json.loads(Path(a["samples_path"]).read_text())
    common = dict(per_device_train_batch_size=a["batch_size"], max_steps=a["steps"], learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                  adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                  report_to=[],
                  seed=SEED, dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
    times, counts = [], []
    Clock = step_clock(times)

    def counted(cls):
        class Counted(cls):
            def training_step(self, model, inputs, *args, **kw):
                counts.append((int((inputs["labels"] != -100).sum()), int(inputs["input_ids"].numel())))
                return super().training_step(model, inputs, *args, **kw)

        return Counted

    with tempfile.TemporaryDirectory() as tmp:
        if trl:
            from trl import SFTConfig, SFTTrainer

            ds = Dataset.from_dict({"input_ids": [s["input_ids"] for s in samples],
                                    "labels": [s["labels"] for s in samples]})
            args = SFTConfig(output_dir=tmp, packing=True, max_length=ROW, **common)
            trainer = counted(SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tok,
                                          callbacks=[Clock()])
        else:
            from transformers import Trainer, TrainingArguments

            ds = Dataset.from_dict({"input_ids": [s["input_ids"] for s in samples],
                                    "attention_mask": [[1] * len(s["input_ids"]) for s in samples],
                                    "labels": [s["labels"] for s in samples]})
            args = TrainingArguments(output_dir=tmp, **common)
            collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
            trainer = counted(Trainer)(model=model, args=args, train_dataset=ds, data_collator=collator,
                                       callbacks=[Clock()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    w = a["warmup"]
    return dict(losses=losses, step_s=times[w:], trained=[c[0] for c in counts[w:]],
                tokens=[c[1] for c in counts[w:]], peak_rss_mb=peak_rss_mb())


# -- the benchmark ------------------------------------------------------------------------------------
def summarise(r: dict) -> dict:
    if "error" in r:
        return r
    t = sum(r["step_s"])
    last = r["losses"][-3:]
    return dict(trained_tok_s=sum(r["trained"]) / t, tok_s=sum(r["tokens"]) / t, step_s=t / len(r["step_s"]),
                trained_per_step=sum(r["trained"]) / len(r["trained"]),
                tokens_per_step=sum(r["tokens"]) / len(r["tokens"]),
                loss_first=r["losses"][0], loss_last3=sum(last) / len(last), steps=len(r["losses"]),
                peak_rss_gb=r["peak_rss_mb"] / 1024, losses=r["losses"], step_times=r["step_s"])


def run(quick: bool, log=print) -> dict:
    warmup, timed = (1, 2) if quick else (1, 6)  # a baseline step takes ~30 s on 2 busy cores
    prep = prepare(quick)
    batch = max(1, round(prep["samples_per_row"]))
    log(f"train: {prep['samples']} samples, {prep['tokens']} tokens; "
        f"{prep['samples_per_row']:.1f} samples per {ROW}-token row -> HF Trainer batch size {batch}; "
        f"{warmup} warm-up + {timed} timed steps each")
    base = dict(prep, steps=warmup + timed, warmup=warmup, batch_size=batch)
    out = {}
    for name, args in (("xtune", dict(base, system="xtune")), ("hf_trainer", dict(base, system="hf")),
                       ("trl_sft", dict(base, system="trl", batch_size=1))):
        t = time.perf_counter()
        out[name] = summarise(run_worker("bench_train.py", args, timeout=1800))
        log(f"train: {name} done in {time.perf_counter() - t:.0f}s: "
            + (out[name].get("error") or f"{out[name]['trained_tok_s']:.0f} trained tok/s, "
               f"loss {out[name]['loss_first']:.3f} -> {out[name]['loss_last3']:.3f}"))
    x = out["xtune"]
    ratios = {}
    for b in ("hf_trainer", "trl_sft"):
        if "error" not in x and "error" not in out[b]:
            ratios[b] = dict(speedup=x["trained_tok_s"] / out[b]["trained_tok_s"],
                             memory=x["peak_rss_gb"] / out[b]["peak_rss_gb"],
                             loss_diff=x["loss_last3"] - out[b]["loss_last3"])
    return dict(config=dict(arch=ARCH, row=ROW, lr=LR, warmup_steps=warmup, timed_steps=timed,
                            hf_batch_size=batch, samples=prep["samples"], data=prep["data_path"],
                            memory="peak RSS (VmHWM) of each system's own process"),
                systems=out, ratios=ratios,
                target=dict(speedup_min=2.0),
                meets=bool(ratios) and len(ratios) == 2 and all(r["speedup"] >= 2.0 for r in ratios.values()))


if __name__ == "__main__":
    a = worker_args()
    emit(work_xtune(a) if a["system"] == "xtune" else _hf_run(a, trl=a["system"] == "trl"))
