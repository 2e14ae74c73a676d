"""lm-evaluation-harness bridge: `xtune eval PATH harness.tasks=[...]` runs `lm_eval.simple_evaluate` with its HF
model class on the model's export, and writes lm-eval's results beside xtune's:
`<out>/eval/lm_eval/results.json` (lm-eval's own dict) and `<out>/eval/<task>/summary.json` per task (its metrics
without lm-eval's `,filter` suffix), which `xtune runs` reads like xtune's own tasks.

Nothing is downloaded: give local-file tasks (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`) in
`harness.include_path`; HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set for the call. lm-eval is imported here only
(an optional extra: `pip install 'xtune[harness]'`).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

from xtune.errors import XtuneError
from xtune.eval.runner import SUMMARY, TaskResult

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def model_args(path: Path) -> dict:
    """lm-eval's HFLM arguments for a run directory (its hf/ export, else hf_adapter/ on its base), an export or
    a PEFT adapter folder."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        for sub in ("hf", "hf_adapter"):
            if (path / sub / "config.json").is_file() or (path / sub / "adapter_config.json").is_file():
                return model_args(path / sub)
        raise XtuneError(f"{path}: the run has no export (hf/ or hf_adapter/) for lm-eval; export a checkpoint "
                         "first: xtune export RUN/checkpoints/step-N OUT")
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise XtuneError(f"{adapter}: its base model {base!r} is not a local folder")
        return {"pretrained": str(base), "peft": str(path)}
    if not (path / "config.json").is_file():
        raise XtuneError(f"{path}: not a Hugging Face model folder (no config.json) for lm-eval")
    return {"pretrained": str(path)}


@contextmanager
def _offline():
    old = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metrics(task_result: dict) -> dict:
    out = {}
    for key, value in task_result.items():
        name = key.split(",")[0]
        if name in ("alias", "samples", "sample_len") or "_stderr" in name or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[name] = float(value)
    return out


def run_harness(path: Path, h, out_dir: Path, *, main: bool = True, device: str = "cpu") -> list[TaskResult]:
    """Run `h.tasks` (HarnessSpec) with lm-eval on the model at `path`; TaskResults for the table."""
    try:  # lazy: lm-eval is an optional extra (xtune[harness])
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise XtuneError("harness.tasks needs lm-evaluation-harness: pip install 'xtune[harness]'") from None
    args = {**model_args(path), "device": device, "dtype": "float32" if device == "cpu" else "auto"}
    t0 = time.perf_counter()
    with _offline():
        manager = TaskManager(include_path=h.include_path) if h.include_path else TaskManager()
        unknown = [t for t in h.tasks if t not in manager.all_tasks]
        if unknown:
            raise XtuneError(f"harness.tasks: {', '.join(unknown)} not found by lm-eval (offline: give local-file "
                             "task YAMLs in harness.include_path)")
        res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(h.tasks), num_fewshot=h.num_fewshot,
                                      limit=h.limit, batch_size=h.batch_size, task_manager=manager, log_samples=False)
    seconds = time.perf_counter() - t0
    results = []
    if res is None:  # lm-eval returns results on its rank 0 only
        return results
    for task in h.tasks:
        metrics = _metrics(res["results"].get(task, {}))
        n = res.get("n-samples", {}).get(task, {}).get("effective", 0)
        results.append(TaskResult(task, metrics, int(n), seconds / len(h.tasks), [], "lm_eval"))
    if main:
        root = Path(out_dir) / "eval"
        (root / "lm_eval").mkdir(parents=True, exist_ok=True)
        (root / "lm_eval" / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        for r in results:
            (root / r.name).mkdir(parents=True, exist_ok=True)
            (root / r.name / SUMMARY).write_text(json.dumps(
                {"task": r.name, "metrics": r.metrics, "samples": r.samples, "seconds": round(r.seconds, 3),
                 "scorer": "lm_eval", "model": str(path)}, indent=2) + "\n")
    return results
