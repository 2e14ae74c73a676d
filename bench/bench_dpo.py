"""Preference tuning: `xtune dpo` vs TRL `DPOTrainer`, on the same model, init, pairs and hyperparameters.

bench_train's tiny Qwen3 (hidden 256, 4 layers, the real 151,936-token vocabulary, one saved random init)
and the real Qwen3 tokenizer; fp32 on CPU; DPO (sigmoid) with beta 0.1, AdamW lr 1e-3 constant (betas
0.9/0.95, no weight decay), clipping at 1.0, one epoch over the same generated pairs (`make_pairs`:
log-normal prompt and response lengths, so padding matters as it does on real preference data).

- xtune: `xtune.methods.train` with `method=dpo`: the two halves of each pair are documents of a soft-packed
  2048-token row (one row per step), log-probs from the chunked head, the reference log-probs computed
  once before the first step by the initial weights (one model held).
- TRL `DPOTrainer` (its defaults): chosen and rejected padded to the longest of the batch, TRL's fused
  LM head (log-probs without [B, T, V] logits), a reference model (a second copy) run every step. The
  batch holds as many pairs as an xtune row does on average. `trl_precompute` also runs TRL with
  `precompute_ref_log_probs=True` (one model; the reference pass over the data before training).

Step times span forward, backward and the optimizer step (xtune's `step_time_s`; on_step_begin ..
on_step_end for TRL). The first step is a warm-up and not timed. Two throughputs: `trained tok/s` over
the timed steps; `with ref` adds the reference pass that ran before training to the time (xtune and
trl_precompute), pro rata over the trained tokens, so it is comparable with TRL's default, which pays for
the reference inside each step. Losses: the step-1 loss is ln 2 = 0.6931 for both (the reference equals
the policy); later steps see different pairs (packing and sampler order differ), so the curves agree in
trend only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ARCH, SEED, init_model_dir, step_clock, step_stats, train_records  # noqa: E402
from common import CACHE, emit, peak_rss_mb, run_worker, worker_args  # noqa: E402

ROW = 2048
DOC_MAX = 1024  # no document is truncated by either system: generated pairs stay below this
LR = 1e-3
BETA = 0.1
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


def make_pairs(n: int, seed: int = 0) -> list:
    """`n` explicit-prompt pairs of random words: prompt ~ 120 and responses ~ 180 tokens (log-normal)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def text(mean_words: float) -> str:
        k = int(np.clip(rng.lognormal(math.log(mean_words), 0.6), 4, 300))
        return " ".join(rng.choice(WORDS, k))

    return [{"prompt": [{"role": "user", "content": text(100)}],
             "chosen": [{"role": "assistant", "content": text(150)}],
             "rejected": [{"role": "assistant", "content": text(150)}]} for _ in range(n)]


def xtune_spec(tok_dir: Path, model_dir: Path, work_dir: Path, data_path: str, extra=()):
    from xtune.config.compose import load_spec

    _, spec = load_spec([
        "recipe=demo_dpo", "model.family=qwen3", *extra, f"model.load_from={model_dir}", f"model.tokenizer={tok_dir}",
        f"data.datasets=[{{name:pairs,path:{data_path}}}]", "data.eval_datasets=[]",
        f"data.cache_dir={CACHE / 'data'}", f"data.sample_max_length={DOC_MAX}", f"data.pack_max_length={ROW}",
        "data.pack=soft", "data.num_workers=0",
        "pref.loss=dpo", f"pref.beta={BETA}", "pref.reference=init",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.betas=[0.9,0.95]", "optim.max_grad_norm=1.0",
        "sched=constant", "sched.warmup_ratio=0.0",
        "loss.mode=chunk", "loss.chunk_size=1024", "parallel.attn=sdpa", "parallel.param_dtype=float32",
        "train.global_batch_size=1", "train.micro_batch_size=1", "train.max_steps=null", "train.epochs=1",
        f"train.seed={SEED}", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
        "train.sample_prompts=[]", f"train.work_dir={work_dir}", "logging.tensorboard=false",
        "logging.progress=plain",
    ], command="dpo")
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, arch={}))  # the saved config as it is


def prepare(quick: bool, n_pairs: int) -> dict:
    """Write the pairs, tokenise them with xtune's data stage (warms its cache) and count its rows."""
    from qwen_tok import qwen3_tokenizer_dir
    from transformers import AutoTokenizer

    from xtune.data.loader import PackedData

    tok_dir = qwen3_tokenizer_dir()
    model_dir = init_model_dir(ARCH)
    path = CACHE / f"dpo_pairs_{n_pairs}.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(n_pairs)))
    spec = xtune_spec(tok_dir, model_dir, Path(tempfile.gettempdir()), str(path))
    data = PackedData(spec.data.datasets, spec, AutoTokenizer.from_pretrained(str(tok_dir)), shuffle=True,
                      verbose=False)
    return dict(tok_dir=str(tok_dir), model_dir=str(model_dir), data_path=str(path), pairs=data.num_pairs,
                rows=len(data.rows), pairs_per_row=data.num_pairs / len(data.rows),
                tokens=data.stats.real_tokens, trained_tokens=data.stats.trained_tokens,
                row_efficiency=data.stats.packing_efficiency)


# -- workers (each in its own process) --------------------------------------------------------------
def work_xtune(a: dict) -> dict:
    import xtune.methods
    from xtune.methods import reference_logps as reference

    spent = []
    compute = reference.reference_logps

    def timed(*args, **kw):  # the reference pass before training, timed for the `with ref` throughput
        t = time.perf_counter()
        out = compute(*args, **kw)
        spent.append(time.perf_counter() - t)
        return out

    reference.reference_logps = timed
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        spec = xtune_spec(Path(a["tok_dir"]), Path(a["model_dir"]), run_dir, a["data_path"], a.get("overrides", ()))
        # A fresh reference each run (the data cache folder would otherwise hold the last run's table).
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, cache_dir=str(Path(tmp) / "cache")))
        xtune.methods.train(spec, run_dir)
        recs = train_records(run_dir)
    return dict(
        step_stats(recs, a["warmup"]),
        accuracies=[r.get("rewards/accuracies") for r in recs],
        trained_all=sum(round(r["trained_tokens_per_s"] * r["step_time_s"]) for r in recs),
        reference_s=sum(spent),
        peak_rss_mb=peak_rss_mb(),
    )


def work_trl(a: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(a["tok_dir"])
    model = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    pairs = [json.loads(ln) for ln in Path(a["data_path"]).read_text().splitlines()]
    ds = Dataset.from_list(pairs)
    times, counts = [], []
    Clock = step_clock(times)

    class Counted(DPOTrainer):
        def training_step(self, model, inputs, *args, **kw):
            # trained = completion tokens whose log-prob is summed (the first token has no prediction: shifted)
            counts.append((int(inputs["completion_mask"][:, 1:].sum()), int(inputs["input_ids"].numel())))
            return super().training_step(model, inputs, *args, **kw)

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=a["batch_size"], num_train_epochs=1,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, beta=BETA,
                         loss_type=["sigmoid"], max_length=DOC_MAX, logging_steps=1, save_strategy="no",
                         report_to=[], seed=SEED, dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
                         precompute_ref_log_probs=a.get("precompute", False))
        t = time.perf_counter()
        trainer = Counted(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        setup_s = time.perf_counter() - t  # tokenisation (+ the reference pass with precompute_ref_log_probs)
        trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    w = a["warmup"]
    return dict(losses=[h["loss"] for h in hist], accuracies=[h.get("rewards/accuracies") for h in hist],
                step_s=times[w:], trained=[c[0] for c in counts[w:]], tokens=[c[1] for c in counts[w:]],
                trained_all=sum(c[0] for c in counts), reference_s=setup_s if a.get("precompute") else 0.0,
                setup_s=setup_s, peak_rss_mb=peak_rss_mb())


# -- the benchmark ------------------------------------------------------------------------------------
def summarise(r: dict) -> dict:
    if "error" in r:
        return r
    t = sum(r["step_s"])
    timed_trained = sum(r["trained"])
    # The reference pass's share of the timed steps: it covered all trained tokens once.
    ref_share = r["reference_s"] * timed_trained / max(1, r["trained_all"])
    last = r["losses"][-3:]
    return dict(trained_tok_s=timed_trained / t, trained_tok_s_with_ref=timed_trained / (t + ref_share),
                tok_s=sum(r["tokens"]) / t, step_s=t / len(r["step_s"]), reference_s=r["reference_s"],
                trained_per_step=timed_trained / len(r["trained"]), tokens_per_step=sum(r["tokens"]) / len(r["tokens"]),
                loss_first=r["losses"][0], loss_last3=sum(last) / len(last), steps=len(r["losses"]),
                peak_rss_gb=r["peak_rss_mb"] / 1024, losses=r["losses"], accuracies=r["accuracies"],
                step_times=r["step_s"])


SYSTEMS = {"xtune": dict(system="xtune"), "trl_dpo": dict(system="trl"),
           "trl_precompute": dict(system="trl", precompute=True)}


def run(quick: bool, log=print, repeats: int = 0) -> dict:
    """`repeats` (env DPO_ROUNDS) rounds of all systems, interleaved (the load drifts); ratios per round."""
    repeats = repeats or int(os.environ.get("DPO_ROUNDS", 1 if quick else 2))
    warmup = 1
    prep = prepare(quick, n_pairs=12 if quick else 18)
    batch = max(1, round(prep["pairs_per_row"]))
    log(f"dpo: {prep['pairs']} pairs, {prep['tokens']} tokens ({prep['trained_tokens']} trained) in {prep['rows']} "
        f"{ROW}-token rows ({prep['pairs_per_row']:.1f} pairs per row -> TRL batch {batch}); one epoch each, "
        f"{warmup} warm-up step not timed; {repeats} round(s); load avg {os.getloadavg()[0]:.1f}")
    base = dict(prep, warmup=warmup, batch_size=batch)
    rounds = []
    for k in range(repeats):
        out = {}
        order = list(SYSTEMS) if k % 2 == 0 else list(SYSTEMS)[::-1]  # alternate: xtune brackets TRL over rounds
        for name in order:
            extra = SYSTEMS[name]
            t = time.perf_counter()
            out[name] = summarise(run_worker("bench_dpo.py", dict(base, **extra), timeout=3600))
            out[name]["load_avg"] = round(os.getloadavg()[1], 2)  # 5-minute average, about the run
            s = out[name]
            log(f"dpo[{k}]: {name} done in {time.perf_counter() - t:.0f}s: " + (s.get("error") or (
                f"{s['trained_tok_s']:.0f} trained tok/s ({s['trained_tok_s_with_ref']:.0f} with ref), peak "
                f"{s['peak_rss_gb']:.2f} GB, loss {s['loss_first']:.4f} -> {s['loss_last3']:.4f}, load "
                f"{s['load_avg']}")))
        rounds.append(dict(systems={n: out[n] for n in SYSTEMS}, ratios=_ratios(out)))
    best = max(rounds, key=lambda r: r["ratios"].get("trl_dpo", {}).get("speedup_with_ref", 0))
    ratios = [r["ratios"] for r in rounds if r["ratios"].get("trl_dpo")]
    meets = bool(ratios) and all(r["trl_dpo"]["speedup_with_ref"] >= 2.0 and r["trl_dpo"]["memory"] <= 0.7
                                 for r in ratios)
    return dict(config=dict(arch=ARCH, row=ROW, lr=LR, beta=BETA, warmup_steps=warmup, trl_batch_size=batch,
                            pairs=prep["pairs"], rows=prep["rows"], tokens=prep["tokens"],
                            trained_tokens=prep["trained_tokens"], row_efficiency=prep["row_efficiency"],
                            memory="peak RSS (VmHWM) of each system's own process"),
                systems=rounds[-1]["systems"], ratios=rounds[-1]["ratios"], rounds=rounds, best_round=best["ratios"],
                target=dict(speedup_min=2.0, memory_max=0.7), meets=meets)


def _ratios(out: dict) -> dict:
    x = out["xtune"]
    res = {}
    for b in ("trl_dpo", "trl_precompute"):
        if "error" not in x and "error" not in out[b]:
            res[b] = dict(speedup=x["trained_tok_s"] / out[b]["trained_tok_s"],
                          speedup_with_ref=x["trained_tok_s_with_ref"] / out[b]["trained_tok_s_with_ref"],
                          memory=x["peak_rss_gb"] / out[b]["peak_rss_gb"],
                          loss_first_diff=x["loss_first"] - out[b]["loss_first"])
    return res


if __name__ == "__main__":
    a = worker_args()
    emit(work_xtune(a) if a["system"] == "xtune" else work_trl(a))
