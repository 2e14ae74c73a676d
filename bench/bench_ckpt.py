"""Training stall per checkpoint save: `train.async_save` against the synchronous save, in one run.

A model sharded with FSDP2 on a 1-rank group (fp32 Linear stack + AdamW: the checkpoint holds weights and
both moments) trains with a save every few steps through xtune's `Checkpointer`. Stall = the time the training
loop spends inside `save()` (for async: staging to host memory, plus waiting for a previous save still in
flight); also the loop's total time against the same steps without saves (the background write shares the
CPU cores with training), and the cost of the checksums (xxh3_128 of every file, re-read after the write) inside
a synchronous save. Sizes: `demo` (the demo recipe's ~1.8M parameters) and `large` (a few hundred MB on disk).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, run_worker, worker_args  # noqa: E402

SIZES = {"demo": (512, 7), "large": (2048, 6)}  # (width, layers): 1.8M and 25M parameters
QUICK = {"demo": (512, 7), "large": (1024, 6)}


def measure(width: int, layers: int, steps: int, every: int) -> dict:
    import torch
    from torch.distributed.fsdp import fully_shard

    from xtune.checkpoint import integrity as checkpoint
    from xtune.checkpoint.dcp import Checkpointer
    from xtune.config.schema import ParallelSpec
    from xtune.parallel.distributed import init_distributed

    torch.manual_seed(0)
    denv = init_distributed(ParallelSpec())
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=denv.mesh)
    fully_shard(model, mesh=denv.mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, width)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # Adam's moments exist from here: the checkpoint has its full size
    root = Path(tempfile.mkdtemp(prefix="xtune-bench-ckpt-"))
    # Hashing's share of a sync save, timed where the save calls it (the files were just written).
    real_digest, hash_s = checkpoint.digest_files, []

    def timed_digest(folder, names):
        t = time.perf_counter()
        out = real_digest(folder, names)
        hash_s.append(time.perf_counter() - t)
        return out

    checkpoint.digest_files = timed_digest
    out = {"params": sum(p.numel() for p in model.parameters())}
    try:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out["no_save_loop_s"] = time.perf_counter() - t
        for mode in ("sync", "async"):
            ck = Checkpointer(root / mode, denv, keep_last=1, async_save=mode == "async")
            t = time.perf_counter()
            ck.save(0, model, opt, {})
            ck.wait()
            first = time.perf_counter() - t  # async: allocates the host buffers the later saves reuse
            hash_s.clear()
            stalls = []
            t_loop = time.perf_counter()
            for i in range(1, steps + 1):
                step()
                if i % every == 0:
                    t = time.perf_counter()
                    ck.save(i, model, opt, {})
                    stalls.append(time.perf_counter() - t)
            t = time.perf_counter()
            ck.close()
            final_wait = time.perf_counter() - t
            loop = time.perf_counter() - t_loop
            size = sum(f.stat().st_size for f in (root / mode / "checkpoints" / f"step-{steps}").iterdir())
            out[mode] = {"stall_s": sum(stalls) / len(stalls), "stalls_s": stalls, "first_save_s": first,
                         "loop_s": loop, "final_wait_s": final_wait, "saves": len(stalls), "bytes": size,
                         "hash_s": sum(hash_s) / len(hash_s) if hash_s else None}
    finally:
        checkpoint.digest_files = real_digest
        shutil.rmtree(root, ignore_errors=True)
        denv.close()
    s, a = out["sync"], out["async"]
    out["stall_ratio"] = a["stall_s"] / s["stall_s"]
    out["overhead_per_save_s"] = {m: (out[m]["loop_s"] - out["no_save_loop_s"]) / out[m]["saves"]
                                  for m in ("sync", "async")}
    return out


def run(quick: bool, log=print) -> dict:
    sizes = QUICK if quick else SIZES
    steps, every = (6, 2) if quick else (12, 3)
    res = {}
    for name, (width, layers) in sizes.items():
        r = run_worker("bench_ckpt.py", {"width": width, "layers": layers, "steps": steps, "every": every})
        res[name] = r
        if "error" in r:
            log(f"ckpt {name}: {r['error']}")
            continue
        s, a = r["sync"], r["async"]
        log(f"ckpt {name}: {r['params'] / 1e6:.1f}M params, {s['bytes'] / 2**20:.0f} MiB per checkpoint; "
            f"stall per save sync {s['stall_s']:.3f}s (of which checksums {s['hash_s']:.3f}s), "
            f"async {a['stall_s']:.3f}s = {r['stall_ratio']:.3f}x sync; loop overhead per save "
            f"sync {r['overhead_per_save_s']['sync']:.3f}s, async {r['overhead_per_save_s']['async']:.3f}s")
    return {"sizes": res, "config": {"steps": steps, "save_every": every, "shapes": sizes}}


if __name__ == "__main__":
    a = worker_args()
    emit(measure(a["width"], a["layers"], a["steps"], a["every"]))
