"""The typed spec of `xtune eval` and of one eval task (the `eval` group, conf/eval/*.yaml).

Kept beside schema.py (which holds the training RunSpec and the `gen` group's GenSpec) so that module stays short;
frozen dataclasses, composed and frozen the same way (`compose_eval.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xtune.config.schema import GenSpec

# Allowed values of the eval task's enumerated fields (validate_eval.py reads them).
EVAL_CHOICES = {
    "eval.data.format": ("auto", "messages", "alpaca", "sharegpt", "fields"),
    "eval.compare": ("exact", "numeric"),
}


@dataclass(frozen=True)
class EvalDataSpec:
    """Where an eval task's records are: any source the data stage reads."""

    # A .jsonl / .json / .parquet / .arrow file, a folder of them, or hf://org/name[:split].
    path: str | None = None
    # auto (detected), messages (the last assistant turn is the reference), alpaca (output is the reference),
    # sharegpt, or fields (eval.prompt_field / eval.reference_field of each record).
    format: str = "auto"
    # Field renames, xtune's name: the dataset's (as data.datasets[].columns).
    columns: dict[str, str] | None = None


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation task: its data, how a prompt is built, and how a completion is scored."""

    # The task's name: the output folder eval/<name> and the metric prefix; null: the eval group option, else the
    # data file's name.
    name: str | None = None
    data: EvalDataSpec = field(default_factory=EvalDataSpec)
    # Records of format fields: the prompt's field, the reference's field and (scorer choice) the options' field.
    prompt_field: str = "question"
    reference_field: str = "answer"
    choices_field: str = "choices"
    # A Python format string over the record's fields making the prompt text, e.g. "{question} Answer after ####."
    # (null: the prompt field as it is).
    template: str | None = None
    # A system message put before the prompt (rendered with the model's chat template, as training renders it).
    system: str | None = None
    # exact, regex (eval.pattern, eval.compare), math (math-verify), choice (log-likelihood of each option, no
    # generation), or module:function (a user function from eval.scorer_path: fn(completion, reference, record)).
    scorer: str = "exact"
    # Normalisation before exact comparisons: any of case, whitespace, punctuation.
    normalize: list[str] = field(default_factory=lambda: ["whitespace"])
    # scorer regex: gsm8k (#### 42), boxed (\\boxed{...}), last_number, or a regex whose first group is the answer.
    pattern: str | None = None
    # scorer regex: exact (normalised strings) or numeric (within tolerance, relative above 1).
    compare: str = "exact"
    tolerance: float = 1e-6
    # Folder put on the import path while a module:function scorer is imported.
    scorer_path: str | None = None
    # pass@k reported for each k (from gen.n samples per prompt, Chen et al.'s unbiased estimator).
    k: list[int] = field(default_factory=lambda: [1])
    # Score only the first N records (null: all).
    limit: int | None = None
    # Remove <think>...</think> blocks from completions before scoring.
    strip_thinking: bool = True


@dataclass(frozen=True)
class HarnessSpec:
    """lm-evaluation-harness (`pip install 'xtune[harness]'`): its tasks run on the model through lm_eval's API."""

    # lm-eval task names, e.g. [hellaswag] (local-file tasks only offline: see include_path).
    tasks: list[str] = field(default_factory=list)
    # A folder of lm-eval task YAMLs (lm_eval's include_path).
    include_path: str | None = None
    # Records per task (null: all).
    limit: int | None = None
    # Few-shot examples (null: the task's default).
    num_fewshot: int | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class EvalRunSpec:
    """What `xtune eval PATH` composes: a task (the eval group), generation settings and the harness bridge."""

    eval: EvalSpec = field(default_factory=EvalSpec)
    gen: GenSpec = field(default_factory=GenSpec)
    harness: HarnessSpec = field(default_factory=HarnessSpec)
