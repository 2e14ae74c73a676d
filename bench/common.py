"""Helpers shared by the benchmarks: subprocess workers, memory readings, machine description."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
RESULT_PREFIX = "BENCH_RESULT "


# -- memory (Linux /proc; the values are kB there) ----------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident set size now."""
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def peak_rss_mb() -> float:
    """High-water mark of the resident set size (since start, or since `reset_peak_rss`)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        import resource

        m = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return m / 2**20 if sys.platform == "darwin" else m / 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


# -- workers ---------------------------------------------------------------------------------------
def emit(result: dict) -> None:
    """A worker's answer: one line on stdout, parsed by `run_worker`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, args: dict, timeout: float = 900, verbose: bool = False, env: dict | None = None) -> dict:
    """Run `python bench/<script> '<json args>'` in a fresh process (`env` added to its environment) and
    return its result dict."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="true", **(env or {}))
    cmd = [sys.executable, str(BENCH / script), json.dumps(args)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                           check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail)}
    if verbose:
        sys.stderr.write(p.stderr[-4000:])
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out.setdefault("wall_s", wall)
    return out


def worker_args() -> dict:
    return json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}


# -- machine ---------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), mem_gb=mem_gb,
                python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                load_avg=[round(x, 2) for x in os.getloadavg()], date=time.strftime("%Y-%m-%d %H:%M %Z"))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
