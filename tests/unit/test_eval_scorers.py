"""Each eval scorer on hand-made cases, pass@k on known values, thinking blocks stripped, user scorers."""

from __future__ import annotations

from math import comb

import pytest

from xtune.errors import ConfigError
from xtune.eval import scorers as S


def test_strip_thinking():
    assert S.strip_thinking("<think>\nlet me see 2+2\n</think>\n\n4") == "4"
    assert S.strip_thinking("<think>\n\n</think>\n\nParis") == "Paris"
    assert S.strip_thinking("a <think>x</think> b <think>y</think> c") == "a  b  c"
    assert S.strip_thinking("42 <think>cut off before it clos") == "42"  # an unclosed block at the end
    assert S.strip_thinking("reasoning opened by the prompt</think>\n\n7") == "7"
    assert S.strip_thinking("no think here") == "no think here"


@pytest.mark.parametrize("completion,reference,options,want", [
    ("Paris", "Paris", ("whitespace",), 1.0),
    ("  Paris \n", "Paris", ("whitespace",), 1.0),
    ("paris", "Paris", ("whitespace",), 0.0),
    ("paris", "Paris", ("case",), 1.0),
    ("1  3\n5", "1 3 5", ("whitespace",), 1.0),
    ("1  3\n5", "1 3 5", (), 0.0),
    ("Paris.", "Paris", ("whitespace",), 0.0),
    ("Paris.", "paris!", ("case", "punctuation"), 1.0),
    ("The capital of France is Paris.", "Paris", ("case", "punctuation", "whitespace"), 0.0),
])
def test_exact_match(completion, reference, options, want):
    assert S.exact_match(completion, reference, options) == want


def test_gsm8k_extraction_numeric():
    ref = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"
    assert S.extract(ref, "gsm8k") == "72"
    assert S.regex_match("so the answer is\n#### 72", ref, "gsm8k", "numeric") == 1.0
    assert S.regex_match("#### 72.0", ref, "gsm8k", "numeric") == 1.0  # numeric: 72.0 == 72
    assert S.regex_match("#### 72.0", ref, "gsm8k", "exact") == 0.0  # exact: the strings differ
    assert S.regex_match("#### 1,072", "#### 1072", "gsm8k", "numeric") == 1.0
    assert S.regex_match("#### 71", ref, "gsm8k", "numeric") == 0.0
    assert S.regex_match("72", ref, "gsm8k", "numeric") == 0.0  # nothing extracted: wrong
    # the last match counts: a model that revises its answer
    assert S.regex_match("#### 70 no wait #### 72", ref, "gsm8k", "numeric") == 1.0


def test_boxed_extraction():
    assert S.boxed_answer(r"so $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert S.boxed_answer(r"\boxed{3} then \boxed{{a}+{b}}") == "{a}+{b}"
    assert S.boxed_answer(r"\boxed{unclosed") is None
    assert S.boxed_answer("none") is None
    assert S.regex_match(r"The answer is \boxed{ 12 }", "12", "boxed", "numeric") == 1.0
    assert S.regex_match(r"\boxed{12}", r"\boxed{13}", "boxed", "numeric") == 0.0


def test_custom_regex_and_last_number():
    assert S.regex_match("The answer is 41, no: 42.", "42", "last_number", "numeric") == 1.0
    assert S.regex_match("Answer: B", "B", r"Answer:\s*([A-D])", "exact") == 1.0
    assert S.regex_match("Answer: C", "B", r"Answer:\s*([A-D])", "exact") == 0.0
    assert S.to_number("$1,234.50") == 1234.5 and S.to_number("3/4") == 0.75 and S.to_number("abc") is None
    assert S.regex_match("x = 0.333", "1/3", "last_number", "numeric", tolerance=1e-6) == 0.0
    assert S.regex_match("x = 0.333", "1/3", "last_number", "numeric", tolerance=1e-2) == 1.0


def test_regex_without_group_is_refused():
    with pytest.raises(ConfigError, match="no group"):
        S.compile_pattern(r"\d+")
    with pytest.raises(ConfigError, match="not a valid regex"):
        S.compile_pattern(r"(\d+")


def test_math_verify_equivalence():
    pytest.importorskip("math_verify")
    assert S.math_equivalent(r"The answer is $\frac{1}{2}$", "0.5") == 1.0
    assert S.math_equivalent(r"$\boxed{2x+2}$", "2(x+1)") == 1.0
    assert S.math_equivalent(r"$\boxed{\{1,2\}}$", r"$\{2,1\}$") == 1.0
    assert S.math_equivalent(r"$\frac{1}{3}$", "0.5") == 0.0
    assert S.math_equivalent("no math at all", "3") == 0.0


def test_choice_by_loglikelihood():
    assert S.choice_correct([-3.0, -1.0, -2.0], 1) == 1.0
    assert S.choice_correct([-3.0, -1.0, -2.0], 2) == 0.0
    assert S.choice_correct([-1.0, -1.0], 0) == 1.0  # a tie goes to the first option


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (5, 2, 3), (10, 0, 1), (10, 10, 5), (20, 3, 10), (4, 1, 4)])
def test_pass_at_k_unbiased_estimator(n, c, k):
    want = 1 - comb(n - c, k) / comb(n, k)  # Chen et al. 2021, directly from the binomials
    assert S.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_known_values():
    assert S.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert S.pass_at_k(1, 1, 1) == 1.0 and S.pass_at_k(1, 0, 1) == 0.0
    assert S.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c/n
    with pytest.raises(ValueError):
        S.pass_at_k(2, 1, 3)


def test_user_scorer_from_a_folder(tmp_path):
    import sys

    (tmp_path / "myscore_evalh.py").write_text(
        "def contains(completion, reference, record):\n"
        "    return reference in completion and record.get('tag') == 'x'\n")
    fn = S.load_user_scorer("myscore_evalh:contains", str(tmp_path))
    assert fn("it is Paris!", "Paris", {"tag": "x"}) is True
    assert str(tmp_path) not in sys.path  # on the path for that import only
    with pytest.raises(ConfigError, match="no module 'nosuch_mod'"):
        S.load_user_scorer("nosuch_mod:f", str(tmp_path))
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        S.load_user_scorer("myscore_evalh:missing", str(tmp_path))


def test_score_text_strips_thinking():
    assert S.score_text("exact", "<think>\nhmm\n</think>\n\nParis", "Paris") == 1.0
    assert S.score_text("regex", "<think>maybe 3</think> it is 4", "4") == 1.0
    assert S.score_text("regex_numeric", "so 4.0", "4") == 1.0  # the GRPO rewards' name
    with pytest.raises(ValueError, match="unknown scorer"):
        S.score_text("nope", "a", "a")
