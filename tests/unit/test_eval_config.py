"""Eval tasks as a config group: composition, overrides, one-off tasks, the items read from each record format, and
every bad task reported (exit 2) before a model is loaded."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_cli import xtune
from xtune.config.compose import load_spec
from xtune.config.compose_eval import compose_eval_jobs
from xtune.config.schema_eval import EvalDataSpec, EvalSpec
from xtune.errors import ConfigError, DataError
from xtune.eval.items import load_items


def problems(overrides):
    with pytest.raises(ConfigError) as e:
        compose_eval_jobs(overrides)
    return e.value.problems


def test_task_group_composes_with_overrides():
    spec = compose_eval_jobs(["eval=demo", "eval.limit=7", "gen.max_new_tokens=9"])[0].spec
    assert spec.eval.name == "demo" and spec.eval.limit == 7 and spec.eval.scorer == "exact"
    assert spec.eval.data.path.endswith("assets/demo/eval.jsonl")
    assert spec.gen.max_new_tokens == 9  # the command line beats the task file's gen section (44)
    assert compose_eval_jobs(["eval=demo"])[0].spec.gen.max_new_tokens == 44


def test_one_off_task_needs_no_file(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    spec = compose_eval_jobs([f"eval.data.path={data}", "eval.scorer=exact", "gen.max_new_tokens=64",
                              "gen.temperature=0"])[0].spec
    assert spec.eval.name == "qa" and spec.gen.max_new_tokens == 64


def test_sweep_expands_to_one_job_per_point():
    jobs = compose_eval_jobs(["eval=demo,gsm8k_local", "eval.data.path=null"], multirun=True, validate=False)
    assert len(jobs) == 2
    with pytest.raises(ConfigError, match="add -m"):
        compose_eval_jobs(["eval=demo", "eval.limit=1,2"])


def test_bad_tasks_are_named():
    p = problems(["eval=demoo"])
    assert "eval=demoo: no such eval task" in p[0] and "Did you mean 'demo'" in p[0]
    p = problems(["eval.scorer=exactt", "eval.data.path=/no/such.jsonl"])
    assert any("eval.scorer=exactt: no such scorer" in x and "Did you mean 'exact'" in x for x in p)
    assert any("eval.data.path=/no/such.jsonl: no such file" in x for x in p)
    p = problems(["eval=demo", "eval.scorer=regex", r"eval.pattern=\d+"])
    assert p == [r"eval.pattern=\d+: the regex has no group; put the answer in ( ), e.g. 'answer is (\d+)' "
                 "(or use gsm8k, boxed, last_number)"]
    p = problems(["eval=demo", "eval.scorer=regex"])
    assert "eval.scorer=regex needs eval.pattern" in p[0]
    p = problems(["eval=demo", "eval.k=[1,4]", "gen.n=2", "gen.temperature=0.7", "eval.normalize=[case,spaces]"])
    assert any("pass@4 needs 1 <= k <= gen.n=2" in x for x in p)
    assert any("spaces not allowed" in x for x in p)
    p = problems(["eval=demo", "eval.scorer=mymod:fn", "eval.scorer_path=/no/such/dir"])
    assert p == ["eval.scorer_path=/no/such/dir: no such folder"]
    assert "unknown key 'lim' in eval. Did you mean 'limit'?" in problems(["eval.lim=3"])[0]


def test_training_eval_tasks_are_checked():
    with pytest.raises(ConfigError) as e:
        load_spec(["recipe=demo", "train.eval_tasks=[demo,nosuch]", "train.keep_best=demo/exact"])
    p = e.value.problems
    assert any(x.startswith("train.eval_tasks[1] (nosuch): eval task nosuch: no such task") for x in p)
    assert any("train.keep_best=demo/exact: choose one of demo/accuracy" in x for x in p)
    _, spec = load_spec(["recipe=demo", "train.eval_tasks=[demo]", "train.eval_tasks_every=50",
                         "train.keep_best=demo/accuracy"])
    assert spec.train.eval_tasks == ["demo"]
    with pytest.raises(ConfigError, match="train.eval_tasks_every=5 but train.eval_tasks is empty"):
        load_spec(["recipe=demo", "train.eval_tasks=[]", "train.eval_tasks_every=5"])


@pytest.mark.parametrize("args, message", [
    (["eval.scorer=exactt", "eval.data.path=/no/such.jsonl"], "eval.scorer=exactt: no such scorer"),
    (["eval=demo", "eval.scorer=regex", r"eval.pattern=\d+"], "the regex has no group"),
    (["eval.data.path=/no/such.jsonl"], "eval.data.path=/no/such.jsonl: no such file or folder"),
])
def test_bad_task_exits_2_before_any_model_is_loaded(tmp_path, args, message):
    # tmp_path holds no model at all: reaching the loader would fail with another message
    out = xtune("eval", str(tmp_path), *args, "--out", str(tmp_path / "out"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "configuration problem" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def _spec(path, **kw):
    return EvalSpec(name="t", data=EvalDataSpec(path=str(path)), **kw)


def test_items_from_each_format(write_jsonl):
    msgs = write_jsonl("m.jsonl", [{"id": "a", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"}]}])
    (it,) = load_items(_spec(msgs))
    assert it.reference == "A2" and it.prompt[-1] == {"role": "user", "content": "Q2"} and len(it.prompt) == 4
    assert it.record == {"id": "a"} and it.source.endswith("m.jsonl:1")
    alp = write_jsonl("a.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    (it,) = load_items(_spec(alp))
    assert it.prompt == [{"role": "user", "content": "Add.\n\n2 and 3"}] and it.reference == "5"
    fields = write_jsonl("f.jsonl", [{"q": "2+2", "a": 4}] * 3)
    items = load_items(_spec(fields, prompt_field="q", reference_field="a", template="Compute {q}.",
                             system="Answer with a number.", limit=2))
    assert len(items) == 2 and items[0].reference == "4"
    assert items[0].prompt == [{"role": "system", "content": "Answer with a number."},
                               {"role": "user", "content": "Compute 2+2."}]
    mc = write_jsonl("mc.jsonl", [{"question": "Sky?", "choices": ["red", "blue"], "answer": "B"},
                                  {"question": "Grass?", "choices": ["green", "blue"], "answer": 0},
                                  {"question": "Sun?", "choices": ["cold", "hot"], "answer": "hot"}])
    items = load_items(_spec(mc, scorer="choice"))
    assert [(i.answer_index, i.reference) for i in items] == [(1, "blue"), (0, "green"), (1, "hot")]


def test_bad_records_name_file_and_line(write_jsonl):
    bad = write_jsonl("b.jsonl", [{"question": "x", "answer": "y"}, {"question": "x"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: no 'answer'"):
        load_items(_spec(bad))
    user_only = write_jsonl("u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"u.jsonl:1: no assistant turn"):
        load_items(_spec(user_only))


def test_items_from_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"problem": ["1+1", "2+2"], "solution": ["2", "4"]}), path)
    items = load_items(EvalSpec(data=EvalDataSpec(path=str(path), columns={"question": "problem", "answer": "solution"})))
    assert [(i.prompt, i.reference, i.source) for i in items] == [
        ([{"role": "user", "content": "1+1"}], "2", f"{path}:row 0"),
        ([{"role": "user", "content": "2+2"}], "4", f"{path}:row 1")]
