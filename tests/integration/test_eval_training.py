"""Eval tasks during training on 2 ranks (FSDP2, gloo): train.eval_tasks runs on the live model every
train.eval_tasks_every steps and logs eval/<task>/<metric> (metrics.jsonl, TensorBoard); train.keep_best keeps the
checkpoint of the best step as checkpoints/best and exports it to hf_best. Checked independently: the logged best
value is recomputed from hf_best by transformers' own greedy generate and the same scorer."""

from __future__ import annotations

import json

import torch

from tests.integration.test_model_families import two_rank_args, xtune_cli

SCORER = """
def distinct(completion, reference, record):
    # a graded score that moves as the model trains: distinct characters of the answer, out of 20
    return min(len(set(completion)), 20) / 20
"""


def test_eval_tasks_during_training_and_keep_best(tmp_path):
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "evalh_distinct.py").write_text(SCORER)
    rows = [json.loads(x) for x in open(__import__("xtune").__path__[0] + "/assets/demo/eval.jsonl")][:6]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tiny_task.yaml"
    task.write_text(f"# @package _global_\neval:\n  name: t\n  data: {{path: {data}}}\n  scorer: evalh_distinct:distinct\n"
                    f"  scorer_path: {tmp_path / 'sc'}\ngen:\n  max_new_tokens: 8\n  batch_size: 4\n")
    run = tmp_path / "run"
    args = [a for a in two_rank_args(6, tmp_path / "cache") if not a.startswith(("logging.tensorboard", "optim.lr"))]
    code, out = xtune_cli(["sft", *args, f"train.work_dir={run}", f"train.eval_tasks=[{task}]",
                           "train.eval_tasks_every=2", "train.keep_best=t/score", "logging.tensorboard=true",
                           "logging.progress=plain", "optim.lr=2e-4"], timeout=500)
    assert code == 0, out[-4000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/t/score"]) for r in recs if "eval/t/score" in r]
    assert [s for s, _ in evals] == [2, 4, 6]
    assert all("eval_tasks_seconds" in r for r in recs if "eval/t/score" in r)
    assert len({v for _, v in evals}) > 1, evals  # the metric moved: the comparison below can fail
    best_step, best = max(evals, key=lambda sv: (sv[1], -sv[0]))  # the first step reaching the highest value
    marker = json.loads((run / "checkpoints" / "best.json").read_text())
    assert marker == {"step": best_step, "metric": "t/score", "value": best}
    assert json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["step"] == best_step
    summary = json.loads((run / "eval" / "t" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["metrics"]["score"] == evals[-1][1]

    # hf_best, generated from by transformers, scores what the live model scored at the best step
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "hf_best")
    model = AutoModelForCausalLM.from_pretrained(run / "hf_best").eval()
    scores = []
    for r in rows:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ids = tok.apply_chat_template(msgs[:last], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        if "</think>" in text:
            text = text.split("</think>", 1)[1]
        elif "<think>" in text:
            text = text.split("<think>", 1)[0]
        scores.append(min(len(set(text.strip())), 20) / 20)
    assert sum(scores) / len(scores) == best

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("eval/t/score")] == [(s, round(v, 5)) for s, v in evals]
