"""Generation throughput: xtune's engine (batched prompts, left padding, KV cache, through transformers' `generate`)
vs a plain loop of transformers `generate` one prompt at a time, and vs lm-evaluation-harness's own HF runner
(`HFLM.generate_until`, when lm-eval is installed), on the same model, prompts and lengths.

Model: bench_lora's `blocks` shape (hidden 512, 8 layers, intermediate 1536, 8 heads / 2 KV heads, the 4,096-token
tiny tokenizer; 28M parameters, most of them in the blocks), random init, saved once to bench/.cache/gen_blocks.
Prompts: the user turns of the demo's held-out chats (eval.jsonl), rendered with the chat template. Greedy, 64 new
tokens at most (a row ends at the tokenizer's EOS, in both systems alike). Both systems run in this
process, one after the other, loop first; the engine at two batch sizes. The engine's completions must equal the
loop's token for token (checked and shown; `meets` needs it). One torch thread per system by default.
Goal (issue 24): engine >= 3x the one-at-a-time loop in generated tokens/s at equal greedy outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from xtune.config.schema import GenSpec
from xtune.generate import Generator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import BLOCKS, TINY_TOK  # noqa: E402
from common import CACHE, ROOT  # noqa: E402

NEW_TOKENS = 64
BATCH_SIZES = (16, 48)


def model_folder() -> Path:
    folder = CACHE / "gen_blocks"
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(TINY_TOK))
    arch = dict(BLOCKS, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen3ForCausalLM(Qwen3Config(**arch)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def prompts(n: int) -> list:
    out = []
    for line in (ROOT / "src" / "xtune" / "assets" / "demo" / "eval.jsonl").read_text().splitlines():
        for m in json.loads(line)["messages"]:
            if m["role"] == "user" and m["content"] not in out:
                out.append(m["content"])
    return out[:n]


def loop(folder: Path, texts: list) -> tuple:
    """transformers alone: from_pretrained, then apply_chat_template + generate per prompt."""
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    outs = []
    t = time.perf_counter()
    for text in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs, time.perf_counter() - t


def engine(folder: Path, texts: list, batch_size: int) -> tuple:
    gen = Generator.from_path(folder)
    spec = GenSpec(max_new_tokens=NEW_TOKENS, batch_size=batch_size)
    t = time.perf_counter()
    outs = [cs[0].token_ids for cs in gen.generate(texts, spec)]
    return outs, time.perf_counter() - t


def lm_eval_runner(folder: Path, texts: list, batch_size: int) -> tuple:
    """lm-evaluation-harness's own HF runner (`HFLM.generate_until`, greedy) on the same chat-rendered prompts, at the
    engine's batch size; None when lm-eval is not installed (`pip install 'xtune[harness]'`). Its outputs are text cut
    at the stop string; tokens counted by re-tokenising them, so a mismatch in the count is not an error."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    tok = AutoTokenizer.from_pretrained(str(folder))
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                for t in texts]
    lm = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=batch_size)
    until = [tok.eos_token] if tok.eos_token else []
    reqs = [Instance(request_type="generate_until", doc={}, idx=i,
                     arguments=(r, {"until": until, "max_gen_toks": NEW_TOKENS, "do_sample": False}))
            for i, r in enumerate(rendered)]
    t = time.perf_counter()
    outs = lm.generate_until(reqs)
    seconds = time.perf_counter() - t
    return [tok(o, add_special_tokens=False)["input_ids"] for o in outs], seconds


def run(quick: bool, log=print) -> dict:
    # One thread each by default (GEN_BENCH_THREADS to change): decoding is many small steps, and on a shared 2-core
    # machine two threads per step mostly wait on each other (measured: the loop fell from 66 to 4 tok/s at load 5).
    torch.set_num_threads(int(os.environ.get("GEN_BENCH_THREADS", "1")))
    transformers.utils.logging.disable_progress_bar()
    folder = model_folder()
    texts = prompts(16 if quick else 48)
    systems = {}
    want, seconds = loop(folder, texts)
    tokens = sum(len(o) for o in want)
    systems["transformers loop (1 prompt per generate)"] = dict(seconds=seconds, tokens=tokens, tok_s=tokens / seconds)
    log(f"gen: loop {tokens} tokens in {seconds:.1f}s")
    ratios, equal = {}, True
    for bs in sorted({min(b, len(texts)) for b in BATCH_SIZES}):
        got, seconds = engine(folder, texts, bs)
        name = f"xtune engine (batch {bs})"
        same = got == want
        equal &= same
        n = sum(len(o) for o in got)
        systems[name] = dict(seconds=seconds, tokens=n, tok_s=n / seconds, equal=same)
        ratios[name] = systems[name]["tok_s"] / systems["transformers loop (1 prompt per generate)"]["tok_s"]
        log(f"gen: {name} {n} tokens in {seconds:.1f}s ({ratios[name]:.2f}x), equal outputs: {same}")
    harness = lm_eval_runner(folder, texts, max(BATCH_SIZES))
    if harness is not None:
        outs, seconds = harness
        n = sum(len(o) for o in outs)
        name = f"lm-eval HFLM.generate_until (batch {max(BATCH_SIZES)})"
        loop_tok_s = systems["transformers loop (1 prompt per generate)"]["tok_s"]
        systems[name] = dict(seconds=seconds, tokens=n, tok_s=n / seconds, vs_loop=n / seconds / loop_tok_s)
        log(f"gen: {name} {n} tokens in {seconds:.1f}s ({n / seconds / loop_tok_s:.2f}x the loop)")
    best = max(ratios.values())
    return dict(config=dict(prompts=len(texts), new_tokens=NEW_TOKENS, params_m=round(sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(str(folder)).parameters()) / 1e6, 1),
        threads=torch.get_num_threads()), systems=systems, ratios=ratios, equal=equal, best_ratio=best,
        target=dict(min_ratio=3.0), meets=equal and best >= 3.0)
