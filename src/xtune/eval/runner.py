"""Run one eval task with a Generator: items -> completions (or option log-likelihoods) -> scores -> metrics.

Writes `<out>/eval/<task>/samples.jsonl` (prompt, completion, reference, score per record) and
`<out>/eval/<task>/summary.json` (metrics, samples, seconds, settings). Under torchrun every rank runs the task
(the Generator shards the prompts over the ranks and gathers them in input order); rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from xtune.config.schema import GenSpec
from xtune.config.schema_eval import EvalSpec
from xtune.config.validate_eval import metric_names
from xtune.eval import scorers as S
from xtune.eval.items import EvalItem, load_items

SUMMARY = "summary.json"
SAMPLES = "samples.jsonl"


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    samples: int
    seconds: float
    rows: list[dict]
    scorer: str = ""

    def flat(self) -> dict[str, float]:
        """{eval/<task>/<metric>: value}: the keys of metrics.jsonl and of the sweep table."""
        return {f"eval/{self.name}/{k}": v for k, v in self.metrics.items()}


def _choice(generator, items: list[EvalItem], gen: GenSpec) -> tuple:
    pairs = [(it.prompt, c) for it in items for c in it.choices]
    lls = generator.loglikelihood(pairs, batch_size=gen.batch_size, gen=gen)
    rows, scores, at = [], [], 0
    for it in items:
        mine = [float(x) for x in lls[at:at + len(it.choices)]]
        at += len(it.choices)
        score = S.choice_correct(mine, it.answer_index)
        best = max(range(len(mine)), key=lambda i: (mine[i], -i))  # noqa: B023 (used at once)
        scores.append([score])
        rows.append({"source": it.source, "prompt": it.prompt, "completion": it.choices[best], "reference": it.reference,
                     "score": score, "loglikelihoods": mine})
    return rows, scores


def _generate(generator, items: list[EvalItem], espec: EvalSpec, gen: GenSpec) -> tuple:
    score = S.make_scorer(espec)
    outs = generator.generate([it.prompt for it in items], gen)
    rows, scores = [], []
    for it, comps in zip(items, outs):
        texts = [c.text for c in comps]
        answers = [S.strip_thinking(t) if espec.strip_thinking else t for t in texts]
        mine = [float(score(a, it.reference, it.record)) for a in answers]
        scores.append(mine)
        row = {"source": it.source, "prompt": it.prompt, "completion": texts[0], "reference": it.reference,
               "score": S.mean(mine), "finish_reason": getattr(comps[0], "finish_reason", None)}
        if len(texts) > 1:
            row.update(completions=texts, scores=mine)
        rows.append(row)
    return rows, scores


def aggregate(scores: list[list[float]], espec: EvalSpec, gen: GenSpec) -> dict[str, float]:
    """accuracy (or score): the mean over every sample; pass@k over items (a sample counts as correct at >= 0.5)."""
    names = metric_names(espec, gen)
    flat = [s for per in scores for s in per]
    metrics = {names[0]: S.mean(flat)}
    for k in espec.k:
        if k > 1 and espec.scorer != "choice":
            metrics[f"pass@{k}"] = S.mean([S.pass_at_k(len(per), sum(s >= 0.5 for s in per), k) for per in scores])
    return metrics


def evaluate_task(generator, espec: EvalSpec, gen: GenSpec) -> TaskResult:
    """Run the task with `generator` (xtune.generate.Generator: .generate / .loglikelihood). Collective under
    torchrun (every rank calls it with the same task)."""
    t0 = time.perf_counter()
    items = load_items(espec)
    if espec.scorer == "choice":
        rows, scores = _choice(generator, items, gen)
    else:
        rows, scores = _generate(generator, items, espec, gen)
    return TaskResult(espec.name, aggregate(scores, espec, gen), len(items), time.perf_counter() - t0, rows,
                      espec.scorer)


def write_result(result: TaskResult, out_dir: Path, espec: EvalSpec, gen: GenSpec, model: str = "",
                 step: int | None = None) -> Path:
    """<out_dir>/eval/<task>/{samples.jsonl, summary.json}, each written whole then renamed into place."""
    folder = Path(out_dir) / "eval" / result.name
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"task": result.name, "metrics": result.metrics, "samples": result.samples,
               "seconds": round(result.seconds, 3), "scorer": result.scorer, "model": str(model), "step": step,
               "eval": dataclasses.asdict(espec), "gen": dataclasses.asdict(gen)}
    _write(folder / SAMPLES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows))
    _write(folder / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return folder


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_summaries(run_dir: Path) -> dict[str, dict]:
    """{task: summary} of a run directory's (or --out folder's) eval/<task>/summary.json files."""
    out = {}
    root = Path(run_dir) / "eval"
    if root.is_dir():
        for f in sorted(root.glob(f"*/{SUMMARY}")):
            try:
                out[f.parent.name] = json.loads(f.read_text())
            except ValueError:
                continue
    return out


def print_results(results: list[TaskResult], console, title: str = "eval") -> None:
    table = Table(title=title)
    for col, just in (("task", "left"), ("metric", "left"), ("value", "right"), ("samples", "right"),
                      ("seconds", "right")):
        table.add_column(col, justify=just)
    for r in results:
        for i, (k, v) in enumerate(r.metrics.items()):
            shown = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
            table.add_row(r.name if i == 0 else "", k, shown, str(r.samples) if i == 0 else "",
                          f"{r.seconds:.1f}" if i == 0 else "")
    console.print(table)
