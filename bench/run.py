"""xtune's side-by-side benchmarks: `make bench` = `python bench/run.py`.

    python bench/run.py                      # everything (~20 min on 2 busy CPU cores)
    python bench/run.py --only pack,cli      # a subset of ORDER below (train, lora, dpo, compile, gpu, ...)
    python bench/run.py --quick              # smaller sizes and fewer steps (a smoke run, not the targets)

Every baseline is measured in the same invocation. Prints tables and writes
bench/results/results.json (merged with earlier results of benchmarks not rerun) and summary.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, machine  # noqa: E402

ORDER = ("pack", "cli", "data", "slowtok", "loss", "train", "auto", "lora", "dpo", "sp", "ckpt", "compile", "gen",
         "evaltrain", "gpu")


def module(name: str):
    import importlib

    return importlib.import_module(f"bench_{name}")


# -- tables -----------------------------------------------------------------------------------------
def _ok(flag) -> str:
    return "[green]yes[/green]" if flag else "[red]no[/red]"


def tables(res: dict):
    from rich.table import Table

    out = []
    b = res["benchmarks"]
    if "train" in b:
        r = b["train"]
        t = Table(title=f"Training: tiny Qwen3 (vocab 151,936), fp32, {r['config']['row']}-token rows, "
                        f"{r['config']['timed_steps']} timed steps; memory = peak RSS of the process")
        for c in ("system", "trained tok/s", "all tok/s", "s/step", "trained tok/step", "peak RSS GB",
                  "loss step 1", "loss last 3", "xtune speed-up"):
            t.add_column(c, justify="right" if c != "system" else "left")
        for name, s in r["systems"].items():
            if "error" in s:
                t.add_row(name, f"[red]{s['error'][:80]}[/red]")
                continue
            ratio = r["ratios"].get(name, {}).get("speedup")
            t.add_row(name, f"{s['trained_tok_s']:.1f}", f"{s['tok_s']:.0f}", f"{s['step_s']:.2f}",
                      f"{s['trained_per_step']:.0f}", f"{s['peak_rss_gb']:.2f}", f"{s['loss_first']:.4f}",
                      f"{s['loss_last3']:.4f}", "" if ratio is None else f"{ratio:.2f}x")
        t.caption = f"target: xtune >= 2x both baselines -> meets: {_ok(r['meets'])}"
        out.append(t)
    if "auto" in b and "error" not in b["auto"]:
        r = b["auto"]
        t = Table(title=f"Generic auto family vs tuned qwen3 (bench_train's Qwen3, {r['config']['row']}-token rows, "
                        f"{r['config']['rounds']} alternating runs x {r['config']['timed_steps']} timed steps)")
        for c in ("family", "trained tok/s", "s/step", "losses"):
            t.add_column(c, justify="right" if c != "family" else "left")
        for name, s in r["systems"].items():
            t.add_row(name, f"{s['trained_tok_s']:.1f}", f"{s['step_s']:.2f}",
                      " ".join(f"{x:.4f}" for x in s["losses"]))
        t.caption = (f"auto / qwen3 tokens/s {r['speed_ratio']:.3f}, max |loss diff| {r['loss_max_abs_diff']:.2e}; "
                     f"target: >= 0.9 and equal losses -> meets: {_ok(r['meets'])}")
        out.append(t)
    if "evaltrain" in b and "error" not in b["evaltrain"]:
        r = b["evaltrain"]
        t = Table(title=f"Eval tasks during training: the demo, {r['config']['steps']} steps, its demo task every "
                        f"{r['config']['eval_tasks_every']} steps")
        for c in ("evals", "eval s", "run s", "share of run", "loop s", "share of loop", "final accuracy"):
            t.add_column(c, justify="right")
        t.add_row(str(r["evals"]), f"{r['eval_s']:.1f}", f"{r['wall_s']:.1f}", f"{100 * r['share_of_wall']:.1f}%",
                  f"{r['loop_s']:.1f}", f"{100 * r['share_of_loop']:.1f}%", f"{r['accuracy'][-1][1]:.4f}")
        t.caption = f"target: <= 10% of the run -> meets: {_ok(r['meets'])}"
        out.append(t)
    if "ckpt" in b:
        r = b["ckpt"]
        t = Table(title=f"Checkpoint save: training stall per save (FSDP2 Linear stack + AdamW, 1 rank, a save every "
                        f"{r['config']['save_every']} steps)")
        for c in ("size", "params", "MiB", "sync stall s", "of which checksums s", "async stall s", "async / sync",
                  "loop cost/save sync s", "async s"):
            t.add_column(c, justify="right" if c != "size" else "left")
        for name, s in r["sizes"].items():
            if "error" in s:
                t.add_row(name, f"[red]{s['error'][:80]}[/red]")
                continue
            sy, an, over = s["sync"], s["async"], s["overhead_per_save_s"]
            t.add_row(name, f"{s['params'] / 1e6:.1f}M", f"{sy['bytes'] / 2**20:.0f}", f"{sy['stall_s']:.3f}",
                      f"{sy['hash_s']:.3f}", f"{an['stall_s']:.3f}", f"{s['stall_ratio']:.3f}x",
                      f"{over['sync']:.3f}", f"{over['async']:.3f}")
        t.caption = ("stall: time inside save(); loop cost: the loop's extra time per save against no saves (the "
                     "background write shares the cores)")
        out.append(t)
    if "loss" in b:
        r = b["loss"]
        t = Table(title="Linear cross-entropy, vocab 151,936, hidden 1024, fp32, forward+backward; "
                        "memory = RSS growth over inputs")
        for c in ("mode", "chunk", "tokens", "peak GB", "time s", "loss/token"):
            t.add_column(c, justify="right")
        for c in r["cases"]:
            if "peak_gb" in c:
                t.add_row(c["mode"], str(c["chunk_size"] or "-"), str(c["tokens"]), f"{c['peak_gb']:.2f}",
                          f"{c['time_s']:.1f}", f"{c['loss']:.4f}")
            else:
                t.add_row(c["mode"], str(c["chunk_size"] or "-"), str(c["tokens"]),
                          f"[yellow]{c.get('skipped') or c.get('error', '')[:60]}[/yellow]", "", "")
        ch = r["checks"]
        bits = [f"{k}: memory {v['memory']:.3f}x ({v.get('memory_excl_weight_grad', float('nan')):.3f}x without "
                f"the weight gradient), time {v['time']:.2f}x"
                for k, v in ch.items() if isinstance(v, dict)]
        bits += [f"{k} {v:.3f}x" for k, v in ch.items() if not isinstance(v, dict)]
        t.caption = ("; ".join(bits) + f"\ntarget: chunk1024 <= 0.06x eager memory and <= 0.6x time at "
                     f"{r['config']['reference_tokens']} tokens, flat peak -> meets: {_ok(r['meets'])}")
        out.append(t)
    if "pack" in b:
        r = b["pack"]
        t = Table(title="Packing efficiency (real tokens / row tokens)")
        t.add_column("data")
        t.add_column("row")
        for s in r["strategies"]:
            t.add_column(s, justify="right")
        for name, d in r["datasets"].items():
            for cap in r["caps"]:
                t.add_row(f"{name} ({d['samples']} samples, mean {d['mean_len']:.0f})", str(cap),
                          *[f"{d['strategies'][f'{s}@{cap}']['efficiency']:.4f}" for s in r["strategies"]])
        out.append(t)
    if "lora" in b and "error" not in b["lora"]:
        r = b["lora"]
        for shape, sh in r["shapes"].items():
            t = Table(title=f"LoRA r {r['config']['r']} (all-linear) vs full fine-tuning vs peft + HF Trainer, shape "
                            f"'{shape}' (hidden {sh['arch']['hidden_size']}, {sh['arch']['num_hidden_layers']} layers, "
                            f"vocab {sh['arch']['vocab_size']}); memory = peak RSS of the process")
            for c in ("system", "trainable params", "trained tok/s", "s/step", "peak RSS GB", "loss step 1",
                      "loss last 3"):
                t.add_column(c, justify="right" if c != "system" else "left")
            for name, s in sh["systems"].items():
                if "error" in s:
                    t.add_row(name, f"[red]{s['error'][:80]}[/red]")
                    continue
                t.add_row(name, f"{s['trainable']:,} of {s['total']:,}", f"{s['trained_tok_s']:.1f}",
                          f"{s['step_s']:.2f}", f"{s['peak_rss_gb']:.2f}", f"{s['loss_first']:.4f}",
                          f"{s['loss_last3']:.4f}")
            q = sh["ratios"]
            if q:
                def label(k):
                    return k.replace("_memory_vs_full", " memory").replace("_ac", " (AC)").replace("_mmap", " mmap")

                parts = [f"{label(k)} {v:.2f}x full" for k, v in q.items() if "_memory_vs_full" in k]
                if "lora_speed_vs_peft_hf" in q:
                    parts.append(f"xtune LoRA {q['lora_speed_vs_peft_hf']:.2f}x peft + HF Trainer tok/s")
                goal = "LoRA (AC) mmap memory <= 0.6x" if shape == "deep" else "tok/s >= 1.5x"
                t.caption = f"{', '.join(parts)}; target {goal} -> meets: {_ok(sh['meets'])}"
            out.append(t)
    if "sp" in b and "error" not in b["sp"]:
        r = b["sp"]
        t = Table(title=f"Sequence parallel (Ulysses): one {r['config']['row']}-token row, tiny Qwen3 (hidden 256, 4 layers), "
                        "fp32, gloo; memory = per-rank RSS growth during forward+backward")
        for c in ("layout", "activation peak MB/rank", "tokens/s", "all-to-all share", "loss"):
            t.add_column(c, justify="right" if c != "layout" else "left")
        for key in ("sp1", "sp2"):
            s = r[key]
            if "error" in s:
                t.add_row(key, f"[red]{s['error'][:80]}[/red]")
                continue
            t.add_row(f"sp={s['sp']}", f"{s['activation_peak_mb']:.0f}", f"{s['tok_s']:.0f}", f"{s['a2a_share']:.1%}",
                      f"{s['loss']:.6f}")
        if "memory_ratio" in r:
            t.caption = (f"sp=2 / sp=1 activation memory {r['memory_ratio']:.2f}x, tokens/s {r['speed_ratio']:.2f}x; "
                         f"target <= 0.6x -> meets: {_ok(r['meets'])}")
        out.append(t)
    if "dpo" in b and "error" not in b["dpo"]:
        r = b["dpo"]
        c = r["config"]
        for k, rnd in enumerate(r["rounds"]):
            t = Table(title=f"DPO (beta {c['beta']}): tiny Qwen3 (vocab 151,936), fp32, {c['pairs']} generated pairs, one "
                            f"epoch ({c['row']}-token rows for xtune, TRL batch {c['trl_batch_size']} pairs), round "
                            f"{k + 1} of {len(r['rounds'])}; memory = peak RSS of the process")
            for col in ("system", "trained tok/s", "with ref", "ref pass s", "s/step", "trained tok/step",
                        "peak RSS GB", "loss step 1", "loss last 3", "load"):
                t.add_column(col, justify="right" if col != "system" else "left")
            for name, s in rnd["systems"].items():
                if "error" in s:
                    t.add_row(name, f"[red]{s['error'][:80]}[/red]")
                    continue
                t.add_row(name, f"{s['trained_tok_s']:.1f}", f"{s['trained_tok_s_with_ref']:.1f}",
                          f"{s['reference_s']:.0f}", f"{s['step_s']:.1f}", f"{s['trained_per_step']:.0f}",
                          f"{s['peak_rss_gb']:.2f}", f"{s['loss_first']:.4f}", f"{s['loss_last3']:.4f}",
                          f"{s['load_avg']:.1f}")
            t.caption = "; ".join(f"xtune vs {b_}: {q['speedup_with_ref']:.2f}x tok/s with ref ({q['speedup']:.2f}x "
                                  f"steps only), {q['memory']:.2f}x memory" for b_, q in rnd["ratios"].items())
            t.caption += f"\ntarget: >= 2x trl_dpo tok/s at <= 0.7x its memory -> meets: {_ok(r['meets'])}"
            out.append(t)
    if "slowtok" in b and "error" not in b["slowtok"]:
        r = b["slowtok"]
        t = Table(title=f"Data preparation with a Python (slow) tokenizer like Intern-S1's (test fixture), "
                        f"{r['records']} chats, {r['tokens']} tokens")
        for c in ("path", "seconds", "tokens/s"):
            t.add_column(c, justify="right" if c != "path" else "left")
        for key, label in (("slow_1", "xtune slow path, 1 process"), ("slow_2", "xtune slow path, 2 processes"),
                           ("raw", "raw tokenizer.encode, 1 process"), ("fast_1", "xtune fast path (tiny Intern-S1), 1 process")):
            t.add_row(label, f"{r[key + '_s']:.2f}", f"{r[key + '_tok_s']:.0f}")
        out.append(t)
    if "data" in b and "error" not in b["data"]:
        r = b["data"]
        t = Table(title=f"Data preparation, Qwen3 tokenizer, {r['records']} chats, {r['tokens']} tokens")
        for c in ("path", "seconds", "tokens/s", "vs raw", "vs raw, CPU time"):
            t.add_column(c, justify="right" if c != "path" else "left")
        labels = {"fast": "xtune cold (parse+template+tokenise+labels+cache+pack)",
                  "fast_1proc": "  same, 1 process (num_workers=0)",
                  "sandbox": "  same, rendered in jinja2's sandbox compiled once",
                  "apply": "  same, rendered by apply_chat_template per record"}
        for key, o in r.get("options", {}).items():
            t.add_row(labels.get(key, key), f"{o['wall_s']:.2f}", f"{o['tok_s']:.0f}", f"{o['ratio']:.2f}x",
                      f"{o['cpu_ratio']:.2f}x")
        t.add_row("xtune warm cache (load+mix+pack)", f"{r['warm_s']:.2f}", f"{r['warm_tok_s']:.0f}",
                  f"{r['warm_ratio']:.2f}x")
        t.add_row("raw tokenizer encode_batch", f"{r['raw_s']:.2f}", f"{r['raw_tok_s']:.0f}", "1.00x", "1.00x")
        t.caption = (f"cold-prep ratio {r['cold_ratio']:.2f}x (CPU time {r.get('cold_cpu_ratio', 0):.2f}x); "
                     f"target: cold >= 0.7x raw -> meets: {_ok(r['meets'])}")
        out.append(t)
        if "render_us" in r:
            t = Table(title="Rendering a chat, CPU us per chat (one process)")
            t.add_column("way", justify="left")
            t.add_column("us/chat", justify="right")
            for name, us in r["render_us"].items():
                t.add_row(name, f"{us:.1f}")
            out.append(t)
    if "cli" in b:
        r = b["cli"]
        t = Table(title="CLI start-up (wall time, fresh process)")
        for c in ("command", "median s", "min s", "max s", "runs"):
            t.add_column(c, justify="right" if c != "command" else "left")
        for name, c in r["commands"].items():
            if "error" in c:
                t.add_row(name, f"[red]{c['error'][:80]}[/red]")
            else:
                t.add_row(name, f"{c['median_s']:.3f}", f"{c['min_s']:.3f}", f"{c['max_s']:.3f}",
                          str(c["runs"]))
        t.caption = f"target: xtune --help < 0.3 s -> meets: {_ok(r['meets'])}"
        out.append(t)
    if "gen" in b and "error" not in b["gen"]:
        r = b["gen"]
        c = r["config"]
        t = Table(title=f"Generation: Qwen3 'blocks' shape ({c['params_m']}M params, random init), fp32, {c['prompts']} "
                        f"demo prompts x {c['new_tokens']} greedy new tokens, {c['threads']} threads")
        for col in ("system", "generated tok/s", "seconds", "tokens", "vs loop", "equal outputs"):
            t.add_column(col, justify="right" if col != "system" else "left")
        for name, s in r["systems"].items():
            ratio = r["ratios"].get(name, s.get("vs_loop"))
            t.add_row(name, f"{s['tok_s']:.1f}", f"{s['seconds']:.1f}", str(s["tokens"]),
                      "1.00x" if ratio is None else f"{ratio:.2f}x", "" if "equal" not in s else _ok(s["equal"]))
        t.caption = f"target: engine >= 3x the one-at-a-time loop at equal greedy outputs -> meets: {_ok(r['meets'])}"
        out.append(t)
    if "compile" in b and "systems" in b["compile"]:
        r = b["compile"]
        t = Table(title="parallel.compile on the blocks shape (hidden 512, 8 layers), fp32 CPU, 2048-token rows")
        for c in ("system", "first step s", "s/step after warm-up", "speed-up", "compile s", "max loss rel diff"):
            t.add_column(c, justify="right" if c != "system" else "left")
        for name, s in r["systems"].items():
            ratio = r["ratios"].get(name, {})
            if "error" in s:
                t.add_row(name, f"[red]{s['error'][:80]}[/red]")
                continue
            t.add_row(name, f"{s['first_step_s']:.1f}", f"{s['step_mean_s']:.2f}",
                      f"{ratio['speedup']:.2f}x" if ratio else "", f"{ratio['compile_s']:.0f}" if ratio else "",
                      f"{ratio['max_loss_rel_diff']:.1e}" if ratio else "")
        out.append(t)
    if "gpu" in b and "configs" in b["gpu"]:
        r = b["gpu"]
        t = Table(title=f"GPU: {r['device']}, Qwen3-0.6B shape, bf16, {r['row']}-token rows")
        for c in ("loss+attn", "tok/s per GPU", "MFU", "vs chunk+sdpa", "peak GB"):
            t.add_column(c, justify="right")
        for name, c in r["configs"].items():
            if "tok_s" in c:
                t.add_row(name, f"{c['tok_s']:.0f}", "-" if c["mfu"] is None else f"{c['mfu']:.1%}",
                          f"{c.get('vs_fallback', 0):.2f}x", f"{c['memory_gb']:.1f}")
            else:
                t.add_row(name, c.get("skipped") or c.get("error", "")[:60])
        out.append(t)
    return out


# -- chart ------------------------------------------------------------------------------------------
def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = res["benchmarks"]
    panels = [k for k in ("train", "loss", "pack", "data", "cli") if k in b and "error" not in b[k]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, k in zip(axes[0], panels, strict=False):
        r = b[k]
        if k == "train":
            names = [n for n, s in r["systems"].items() if "error" not in s]
            ax.bar(names, [r["systems"][n]["trained_tok_s"] for n in names],
                   color=["C0", "C1", "C2"][:len(names)])
            ax.set_ylabel("trained tokens/s")
            ax2 = ax.twinx()
            ax2.plot(names, [r["systems"][n]["peak_rss_gb"] for n in names], "ko--")
            ax2.set_ylabel("peak RSS GB")
            ax.set_title("training throughput")
        elif k == "loss":
            for label, sel in (("eager", ("eager", None)), ("chunk 1024", ("chunk", 1024)),
                               ("chunk 512", ("chunk", 512))):
                pts = [(c["tokens"], c["peak_gb"]) for c in r["cases"]
                       if (c["mode"], c["chunk_size"]) == sel and "peak_gb" in c]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_ylabel("peak extra memory GB")
            ax.set_title("CE memory (V=151,936, H=1024)")
            ax.legend()
        elif k == "pack":
            names = list(r["datasets"])
            width = 0.8 / len(r["strategies"])
            for i, s in enumerate(r["strategies"]):
                ax.bar([j + i * width for j in range(len(names))],
                       [r["datasets"][n]["strategies"][f"{s}@{r['caps'][-1]}"]["efficiency"] for n in names],
                       width, label=s)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"packing efficiency ({r['caps'][-1]}-token rows)")
            ax.legend(fontsize=7)
        elif k == "data":
            ax.bar(["xtune cold", "xtune warm", "raw encode"],
                   [r["cold_tok_s"], r["warm_tok_s"], r["raw_tok_s"]], color=["C0", "C0", "C7"])
            ax.set_yscale("log")
            ax.tick_params(axis="x", labelsize=8)
            ax.set_ylabel("tokens/s (log)")
            ax.set_title("data preparation")
        elif k == "cli":
            names = [n for n, c in r["commands"].items() if "median_s" in c]
            ax.barh([n.replace("xtune ", "") for n in names], [r["commands"][n]["median_s"] for n in names])
            ax.axvline(0.3, color="r", ls=":", label="--help target")
            ax.set_xlabel("seconds (median)")
            ax.set_title("CLI start-up")
            ax.legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"xtune bench - {m['date']} - {m['cpu']} x{m['cores']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(ORDER), help=f"comma list of {', '.join(ORDER)}")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few steps (checks the harness, not the targets)")
    p.add_argument("--results", default=str(BENCH / "results"),
                   help="folder for results.json and summary.png")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in ORDER]
    if bad:
        p.error(f"unknown benchmark(s) {bad}; choose from {', '.join(ORDER)}")

    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=140)  # tables unwrapped in logs
    err = Console(stderr=True)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    res = json.loads(json_path.read_text()) if json_path.exists() else {}
    res.setdefault("benchmarks", {})
    res["machine"] = machine()
    res["quick"] = args.quick
    t_all = time.perf_counter()
    for name in (n for n in ORDER if n in only):
        t = time.perf_counter()
        err.print(f"[bold]== {name}[/bold]")
        r = module(name).run(args.quick, log=lambda m: err.print(m, highlight=False))
        r["seconds"] = time.perf_counter() - t
        r["quick"] = args.quick
        res["benchmarks"][name] = r
        json_path.write_text(json.dumps(res, indent=1))  # keep what is done if a later one fails
    res["seconds"] = time.perf_counter() - t_all
    res["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path.write_text(json.dumps(res, indent=1))
    try:
        chart(res, out_dir / "summary.png")
    except ImportError:  # matplotlib comes with the bench extra (`make bench` installs it)
        console.print("no chart: matplotlib is not installed (pip install -e '.[bench]')")
    m = res["machine"]
    console.print(f"xtune bench {m['date']}: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB, "
                  f"torch {m['torch']}, load avg {m['load_avg']} -> {m['load_avg_end']}; "
                  f"{res['seconds']:.0f}s"
                  + ("  (--quick: not the targets' sizes)" if args.quick else ""))
    for t in tables({"benchmarks": {k: v for k, v in res["benchmarks"].items() if k in only}}):
        console.print(t)
    console.print(f"results: {json_path}, {out_dir / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
