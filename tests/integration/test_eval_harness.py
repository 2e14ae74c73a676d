"""The lm-evaluation-harness bridge, offline: a local-file lm-eval task (made here) runs through
`xtune eval PATH harness.tasks=[...]`; its accuracy equals the one computed independently with transformers from
lm-eval's documented multiple-choice rule (argmax of log p(" " + option | question))."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_cli import xtune
from tests.integration.test_eval_run import model_dir  # noqa: F401 (the tiny model folder fixture)

pytest.importorskip("lm_eval")


def test_harness_task_from_local_files(model_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    options = ["yes", "no", "maybe"]
    questions = [f"Is {i} a small number?" for i in range(6)]

    def ll(context, option):
        whole = tok(context + " " + option, add_special_tokens=False)["input_ids"]
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        return sum(float(logp[j - 1, whole[j]]) for j in range(len(ctx), len(whole)))

    best = [max(range(3), key=lambda k: ll(q, options[k])) for q in questions]  # noqa: B023
    answers = [b if i < 4 else (b + 1) % 3 for i, b in enumerate(best)]  # 4 of 6 right
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": options, "answer": a}) + "\n"
                            for q, a in zip(questions, answers)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        "task: xtune_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    out = xtune("eval", str(model_dir), "harness.tasks=[xtune_local_mc]", f"harness.include_path={tasks}",
                "--out", str(tmp_path / "res"), env={"HF_HOME": str(tmp_path / "hf_home")}, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "res" / "eval" / "xtune_local_mc" / "summary.json").read_text())
    assert summary["metrics"]["acc"] == pytest.approx(4 / 6)
    assert summary["samples"] == 6
    assert (tmp_path / "res" / "eval" / "lm_eval" / "results.json").is_file()
    assert "xtune_local_mc" in out.stdout and "acc" in out.stdout

    bad = xtune("eval", str(model_dir), "harness.tasks=[no_such_task]", f"harness.include_path={tasks}",
                "--out", str(tmp_path / "res2"), env={"HF_HOME": str(tmp_path / "hf_home")})
    assert bad.returncode == 2 and "no_such_task not found by lm-eval" in bad.stderr
