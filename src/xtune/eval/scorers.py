"""Scorers: one completion (or the log-likelihoods of a question's options) against its reference -> a score in [0, 1].

Builtins (`eval.scorer`):
- `exact`: the normalised completion equals the normalised reference (`eval.normalize`: case, whitespace,
  punctuation);
- `regex`: the answer extracted from the completion (`eval.pattern`: a regex with one group, or `gsm8k`
  (`#### 42`), `boxed` (`\\boxed{...}`, nested braces allowed), `last_number`) compared with the reference (also
  extracted when it matches the pattern, so GSM8K's whole solution can be the reference) by `eval.compare`: exact
  (normalised) or numeric (within `eval.tolerance`);
- `math`: mathematical equivalence by the `math-verify` package (LaTeX, fractions, sets, intervals);
- `choice`: multiple choice by the log-likelihood of each option after the prompt (no generation): 1 when the
  most likely option is the reference;
- `module:function`: a user function `fn(completion, reference, record) -> float | bool` from a module under
  `eval.scorer_path` (their own code, imported because their config names it).

Thinking blocks (`<think>...</think>`, also one left open by a cut-off generation) are removed before scoring.
The GRPO rewards reuse `score_text` with the same names.
"""

from __future__ import annotations

import importlib
import math
import re
import string
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

from xtune.config.validate_eval import BOXED, BUILTIN_SCORERS, NAMED_PATTERNS, pattern_problem
from xtune.errors import ConfigError

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_PUNCT = str.maketrans("", "", string.punctuation)


def strip_thinking(text: str) -> str:
    """The answer without its reasoning: every `<think>...</think>` block (and an unclosed one at the end) removed;
    text before a lone `</think>` (a template that opened the block in the prompt) is dropped too."""
    if "</think>" in text and "<think>" not in text.split("</think>", 1)[0]:
        text = text.split("</think>", 1)[1]
    return _THINK.sub("", text).strip()


def normalize(text: str, options: Iterable[str] = ("whitespace",)) -> str:
    """`case`: lower case; `punctuation`: ASCII punctuation removed; `whitespace`: runs of whitespace become one
    space and the ends are stripped. The ends are always stripped."""
    opts = set(options)
    if "case" in opts:
        text = text.lower()
    if "punctuation" in opts:
        text = text.translate(_PUNCT)
    if "whitespace" in opts:
        text = " ".join(text.split())
    return text.strip()


def exact_match(completion: str, reference: str, options: Iterable[str] = ("whitespace",)) -> float:
    return float(normalize(completion, options) == normalize(reference, options))


def boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced; None without one."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
        j += 1
    return None  # unbalanced: cut off before it closed


def compile_pattern(pattern: str) -> re.Pattern:
    """A named pattern or a regex with at least one group (ConfigError otherwise)."""
    problem = pattern_problem(pattern)
    if problem:
        raise ConfigError([problem])
    return re.compile(NAMED_PATTERNS.get(pattern, pattern), re.DOTALL)


def extract(text: str, pattern: str) -> str | None:
    """The answer named by `pattern` in `text` (the last match's first group), or None."""
    if pattern == BOXED:
        return boxed_answer(text)
    matches = list(compile_pattern(pattern).finditer(text))
    if not matches:
        return None
    groups = [g for g in matches[-1].groups() if g is not None]
    return groups[0].strip() if groups else None


def to_number(text: str | None) -> float | None:
    """`1,234.5`, `-3`, `$12`, `50%`, `3/4` -> float; None when it is not a number."""
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").rstrip("%").rstrip(".").strip()
    if re.fullmatch(r"[-+]?\d+\s*/\s*\d+", t):
        num, den = (float(x) for x in t.split("/"))
        return num / den if den else None
    try:
        value = float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def regex_match(completion: str, reference: str, pattern: str, compare: str = "exact",
                options: Iterable[str] = ("whitespace",), tolerance: float = 1e-6) -> float:
    """1 when the answer extracted from the completion equals the reference: the reference as it is when it is a
    number, else the answer the pattern finds in it (GSM8K's whole solution), else the reference as it is."""
    got = extract(completion, pattern)
    if got is None:
        return 0.0
    want = None if to_number(reference) is not None else extract(reference, pattern)
    want = reference.strip() if want is None else want
    if compare == "numeric":
        a, b = to_number(got), to_number(want)
        return float(a is not None and b is not None and abs(a - b) <= tolerance * max(1.0, abs(b)))
    return exact_match(got, want, options)


def math_equivalent(completion: str, reference: str) -> float:
    """math-verify's `verify(parse(reference), parse(completion))`: the gold first, as its authors require."""
    try:  # lazy: math-verify is an optional extra (xtune[eval])
        from math_verify import parse, verify
    except ImportError:
        raise ConfigError(["eval.scorer=math needs the math-verify package: pip install 'xtune[eval]'"]) from None
    gold = parse(reference if "$" in reference or "\\" in reference else f"${reference}$")
    answer = parse(completion)
    if not gold or not answer:
        return 0.0
    try:
        return float(verify(gold, answer))
    except Exception:  # noqa: BLE001 (sympy can fail on odd input: not equivalent)
        return 0.0


def choice_correct(loglikelihoods: Sequence[float], reference_index: int) -> float:
    """Multiple choice: 1 when the option with the highest log-likelihood is the reference (first one on ties)."""
    best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    return float(best == reference_index)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased estimator of pass@k from n samples of which c are correct:
    1 - C(n - c, k) / C(n, k), computed as a product (no large binomials)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@contextmanager
def _on_path(folder: str | None):
    if folder is None:
        yield
        return
    path = str(Path(folder).expanduser().resolve())
    sys.path.insert(0, path)
    try:
        yield
    finally:
        if path in sys.path:
            sys.path.remove(path)


def load_user_scorer(ref: str, scorer_path: str | None = None) -> Callable:
    """`module:function`, imported with `scorer_path` on sys.path for that import only. ConfigError when the module
    or the function is missing."""
    module_name, _, fn_name = ref.partition(":")
    where = f" (looked in {scorer_path} and on the import path)" if scorer_path else " (set eval.scorer_path=DIR)"
    with _on_path(scorer_path):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name.split(".")[0]):
                raise ConfigError([f"eval.scorer={ref}: no module {module_name!r}{where}"]) from None
            raise
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError([f"eval.scorer={ref}: module {module_name} ({getattr(module, '__file__', '?')}) has no "
                           f"function {fn_name!r}"])
    return fn


def is_user_scorer(name: str) -> bool:
    return ":" in name


def make_scorer(spec) -> Callable[[str, str, dict], float]:
    """`score(completion, reference, record) -> float` for a generating scorer of an EvalSpec (not `choice`)."""
    name = spec.scorer
    if name == "exact":
        return lambda c, r, rec: exact_match(c, r, spec.normalize)
    if name == "regex":
        compile_pattern(spec.pattern) if spec.pattern != BOXED else None
        return lambda c, r, rec: regex_match(c, r, spec.pattern, spec.compare, spec.normalize, spec.tolerance)
    if name == "math":
        return lambda c, r, rec: math_equivalent(c, r)
    if is_user_scorer(name):
        fn = load_user_scorer(name, spec.scorer_path)

        def user(c, r, rec):
            value = fn(c, r, rec)
            if isinstance(value, bool) or isinstance(value, (int, float)):
                return float(value)
            raise TypeError(f"eval.scorer={name} returned {type(value).__name__}; return a number or a bool")

        return user
    raise ConfigError([f"eval.scorer={name}: choose one of {', '.join(BUILTIN_SCORERS)} or module:function"])


def score_text(name: str, completion: str, reference: str, **args) -> float:
    """One score by a builtin's name (for callers without an EvalSpec, e.g. GRPO rewards); thinking is stripped."""
    completion = strip_thinking(completion)
    name = {"regex_numeric": "regex", "math_verify": "math"}.get(name, name)  # the GRPO rewards' names
    if name == "exact":
        return exact_match(completion, reference, args.get("normalize", ("whitespace",)))
    if name == "regex":
        return regex_match(completion, reference, args.get("pattern", "last_number"), args.get("compare", "numeric"),
                           args.get("normalize", ("whitespace",)), args.get("tolerance", 1e-6))
    if name == "math":
        return math_equivalent(completion, reference)
    raise ValueError(f"unknown scorer {name!r}; choose one of exact, regex (regex_numeric), math (math_verify)")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
