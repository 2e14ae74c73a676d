"""Shared pieces of the reliability suite: the `xtune` command as a user runs it (a real process),
a small real chat dataset in tmp, the overrides of a short single-process run, and checkpoint-folder
inspection that does not use the engine's own reader (so it can disagree with it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "xtune" / "assets" / "demo"
FAULTS = Path(__file__).resolve().parent / "faults.py"
STEPS = 10


def env(extra=None) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "XTUNE_FAULT")}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", COLUMNS="250")
    e.update(extra or {})
    return e


def xtune(*args, fault=None, timeout=180) -> subprocess.CompletedProcess:
    """`python -m xtune ARGS` (or the same CLI under tests/reliability/faults.py with XTUNE_FAULT)."""
    cmd = [sys.executable, str(FAULTS)] if fault else [sys.executable, "-m", "xtune"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env({"XTUNE_FAULT": fault} if fault else None))


def start(*args) -> subprocess.Popen:
    """The CLI in its own session, so a test can SIGKILL it (and anything it started) at once."""
    return subprocess.Popen([sys.executable, "-m", "xtune", *map(str, args)], cwd=ROOT, env=env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_logged(args, log: Path) -> subprocess.Popen:
    """The CLI in its own session, its output in the file `log` (not a pipe: orphaned workers would hold
    a pipe open)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "xtune", *map(str, args)], cwd=ROOT, env=env(),
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, log: Path, step: int, timeout: float = 180) -> None:
    """Until the run has logged `step`; fails with the log's tail if the process ends or time runs out."""
    import time

    deadline = time.time() + timeout
    while last_step(run_dir) < step:
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        assert time.time() < deadline, f"the run never reached step {step}"
        time.sleep(0.05)


def write_chat_data(path: Path, n: int = 40) -> Path:
    """The first `n` records of the bundled demo chat data (real records, real tokenizer)."""
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_args(data: Path, cache: Path, work_dir: Path, *extra) -> list:
    """A short deterministic single-process run of the demo recipe: tiny Qwen3, no eval, a checkpoint
    every step, every step logged."""
    return ["sft", "recipe=demo", f"data.datasets=[{{name:chat,path:{data}}}]", "data.eval_datasets=[]",
            "train.eval_every=0", "train.sample_prompts=[]", "data.pack_max_length=512",
            "data.sample_max_length=512", f"data.cache_dir={cache}", "data.num_workers=0",
            "logging.tensorboard=false", "logging.progress=plain", "train.log_every=1",
            f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=3", f"train.work_dir={work_dir}",
            *extra]


def records(run_dir: Path) -> list:
    """Training records of metrics.jsonl (a line cut short by a kill is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            out.append(rec)
    return out


def last_step(run_dir: Path) -> int:
    return max([0] + [r["step"] for r in records(run_dir)])


def checkpoint_state(run_dir: Path) -> dict:
    """What is on disk under checkpoints/, read directly: complete `step-N` folders (with their marker),
    the `latest` pointer, and leftover temporary folders."""
    root = Path(run_dir) / "checkpoints"
    steps, incomplete, tmp = [], [], []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and p.is_dir():
                marker = p / "meta.json"
                ok = marker.is_file() and json.loads(marker.read_text()).get("complete") is True
                (steps if ok else incomplete).append(int(p.name[5:]))
            elif p.name.startswith(".tmp-step-"):
                tmp.append(p.name)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    return {"complete": sorted(steps), "incomplete": sorted(incomplete), "tmp": sorted(tmp), "latest": latest}


def assert_same_losses(reference: list, got: list) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in reference], "each step exactly once, in order"
    for a, b in zip(reference, got):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]


# -- the bad-input table (test_bad_input_table.py) ----------------------------------------------------------------------------
GOOD = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()[:12]]
IMAGE = next(p for p in sorted((DEMO / "images").iterdir()) if p.suffix in (".png", ".jpg"))


def quick_run(tmp_path, *extra):
    """A one-step run on tiny packed rows: a data error surfaces after tokenisation, within seconds."""
    return ["sft", "recipe=demo", "train.max_steps=1", "train.save_every=0", "train.eval_every=0",
            "train.global_batch_size=2", "train.micro_batch_size=1", "train.sample_prompts=[]",
            "data.eval_datasets=[]", "data.pack_max_length=256",
            "data.sample_max_length=256", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
            "logging.tensorboard=false", "logging.progress=plain", f"train.work_dir={tmp_path / 'run'}", *extra]


def write_lines(path, lines):
    """A JSONL file: dicts are dumped, strings written as they are (a malformed line), bytes too (bad encoding)."""
    data = b"".join((ln if isinstance(ln, bytes) else (ln if isinstance(ln, str) else json.dumps(ln)).encode())
                    + b"\n" for ln in lines)
    path.write_bytes(data)
    return path


def image_msg(n_placeholders, image, **extra):
    content = [{"type": "image_url", "image_url": {"url": str(image), **extra}},
               {"type": "text", "text": "<IMG_CONTEXT>" * n_placeholders + "\nWhat shape is this?"}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "A circle."}]}


def run_all(jobs):
    """Run independent CLI invocations two at a time (each is one mostly single-threaded process)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(xtune, *args) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}
