"""CLI start-up: wall time of `xtune --help` and `xtune sft recipe=demo --cfg job` (median of runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median  # noqa: E402

COMMANDS = {
    "xtune --help": ["--help"],
    "xtune sft recipe=demo --cfg job": ["sft", "recipe=demo", "--cfg", "job"],
}


def xtune_exe() -> list:
    exe = Path(sys.executable).parent / "xtune"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "xtune"]


def run(quick: bool, log=print) -> dict:
    runs = 2 if quick else 7
    env = dict(os.environ)
    out = {}
    for name, argv in COMMANDS.items():
        times = []
        warm = 0 if quick else 1  # a first, untimed run warms the file cache
        for i in range(runs + warm):
            t = time.perf_counter()
            p = subprocess.run(xtune_exe() + argv, capture_output=True, text=True, cwd=ROOT, env=env,
                               check=False)
            dt = time.perf_counter() - t
            if p.returncode != 0:
                out[name] = {"error": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}
                break
            if i >= warm:
                times.append(dt)
        else:
            out[name] = dict(median_s=median(times), min_s=min(times), max_s=max(times), runs=runs)
        log(f"cli: {name}: " + (out[name].get("error") or f"median {out[name]['median_s']:.3f}s"))
    help_s = out["xtune --help"].get("median_s")
    return dict(commands=out, target=dict(help_max_s=0.3), meets=help_s is not None and help_s < 0.3)
