"""Ulysses sequence parallelism: one long row on a tiny Qwen3, sp=1 (1 process) against sp=2 (2 processes, gloo).

The row is one document of `row` tokens (16,384; --quick 4,096), all trained; the model's blocks hold most of
its parameters (hidden 256, 4 layers, 8 heads / 2 KV heads, vocab 4,096), fp32, sdpa, chunked CE, no activation
checkpointing. Per rank: the activation peak of one forward+backward = peak RSS during it minus the RSS before
it (after a warm-up step; freed heap returned with malloc_trim and large blocks mmapped so frees show), the
step time, and the time spent in the all-to-all (forward and backward). Goal (issue 13): activation peak per
rank at sp=2 <= 0.6x sp=1. On CPU the time is not the point; the memory is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULT_PREFIX, ROOT, emit, peak_rss_mb, reset_peak_rss, rss_mb, worker_args  # noqa: E402

ARCH = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=32768, tie_word_embeddings=False)
# Large blocks mmapped (returned to the OS when freed): the RSS then follows what is alive.
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _init_dir() -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = CACHE / "sp_qwen3_h256_l4_v4096_init"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(**ARCH)).save_pretrained(str(folder))
    return folder


class OneRow:
    """The same single-document row at every step."""

    def __init__(self, tokens: int, steps: int):
        import torch

        from xtune.data.types import PackedBatch

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, ARCH["vocab_size"], (1, tokens), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
        self.batch = PackedBatch(input_ids=ids, labels=labels, position_ids=torch.arange(tokens)[None],
                                 cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32), max_seqlen=tokens)
        self.total_steps, self.pos = steps, 0

    def __next__(self):
        self.pos += 1
        return [self.batch]

    def state_dict(self):
        return {"pos": self.pos}


def worker(args: dict) -> None:
    import ctypes
    import gc

    import torch

    from xtune.config.schema import LossSpec, ModelSpec, OptimSpec, ParallelSpec, RunSpec, TrainSpec
    from xtune.engine.trainer import Trainer
    from xtune.methods import get_method
    from xtune.models import get_adapter
    from xtune.parallel import ulysses
    from xtune.parallel.distributed import init_distributed

    spent = [0.0]
    inner = ulysses._all_to_all

    def timed(*a, **kw):  # the all-to-all's own time (the wrapper's communication)
        t = time.perf_counter()
        out = inner(*a, **kw)
        spent[0] += time.perf_counter() - t
        return out

    ulysses._all_to_all = timed
    sp, steps = args["sp"], args["steps"]
    spec = RunSpec(model=ModelSpec(family="qwen3", load_from=args["model_dir"]),
                   parallel=ParallelSpec(sp_size=sp, attn="sdpa"), loss=LossSpec(mode="chunk", chunk_size=1024),
                   optim=OptimSpec(lr=1e-4), train=TrainSpec(global_batch_size=1, max_steps=steps + 1))
    denv = init_distributed(spec.parallel)
    tr = Trainer(spec, "/tmp/xtune_bench_sp", method=get_method(spec), adapter=get_adapter(spec.model), tokenizer=None,
                 loader=OneRow(args["row"], steps + 1), denv=denv)
    tr.train_step(next(tr.loader))  # warm-up: optimizer state, first-touch allocations
    times, peaks, shares, losses = [], [], [], []
    for _ in range(steps):
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        base = rss_mb()
        reset_peak_rss()
        spent[0] = 0.0
        t = time.perf_counter()
        stats = tr.forward_backward(next(tr.loader))
        dt = time.perf_counter() - t
        peaks.append(peak_rss_mb() - base)
        times.append(dt)
        shares.append(spent[0] / dt)
        losses.append(stats["loss"])
        tr.optimizer_step()
    mine = dict(activation_peak_mb=min(peaks), step_s=min(times), a2a_share=min(shares), loss_first=losses[0])
    everyone = [None] * denv.world_size
    torch.distributed.all_gather_object(everyone, mine)
    if denv.is_main:
        emit(dict(sp=sp, row=args["row"], ranks=everyone, tok_s=args["row"] / max(r["step_s"] for r in everyone),
                  activation_peak_mb=max(r["activation_peak_mb"] for r in everyone),
                  a2a_share=max(r["a2a_share"] for r in everyone), loss=losses[0]))
    denv.barrier()
    denv.close()


def _launch(args: dict, nproc: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(args)]
    if nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={port}"] + cmd[1:]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env, **ENV}, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: " + " | ".join((p.stderr or p.stdout).strip().splitlines()[-6:])}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run(quick: bool, log=print) -> dict:
    row, steps = (4096, 1) if quick else (16384, 2)
    base = dict(model_dir=str(_init_dir()), row=row, steps=steps)
    out = {"config": dict(row=row, timed_steps=steps, arch=ARCH)}
    for sp in (1, 2):
        t = time.perf_counter()
        out[f"sp{sp}"] = r = _launch(dict(base, sp=sp), sp, timeout=3600)
        log(f"sp: sp={sp} done in {time.perf_counter() - t:.0f}s: "
            + (r.get("error") or f"{r['tok_s']:.0f} tok/s, activation peak {r['activation_peak_mb']:.0f} MB/rank, "
               f"all-to-all {r['a2a_share']:.1%} of the step, loss {r['loss']:.4f}"))
    one, two = out["sp1"], out["sp2"]
    if "error" not in one and "error" not in two:
        out["memory_ratio"] = two["activation_peak_mb"] / one["activation_peak_mb"]
        out["speed_ratio"] = two["tok_s"] / one["tok_s"]
        out["loss_rel_diff"] = abs(two["loss"] - one["loss"]) / abs(one["loss"])
        out["meets"] = out["memory_ratio"] <= 0.6
    return out


if __name__ == "__main__":
    worker(worker_args())
