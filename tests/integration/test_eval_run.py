"""`xtune eval` end to end on a tiny model folder: scores equal an independent computation (transformers' own greedy
`generate` and forward pass on the same folder), outputs land in --out/eval/<task>/, the table is printed; a user
scorer and the multiple-choice scorer run through the same path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_cli import xtune

TOK = Path(__file__).resolve().parents[2] / "src" / "xtune" / "assets" / "tokenizers" / "qwen3_tiny"
QUESTIONS = ["What is 2 + 3?", "Sort 7 2 9 4", "Hello!", "Name a colour.", "What comes after B?", "Reverse: a b c"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from xtune.models.tiny import QWEN3_TINY

    out = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**QWEN3_TINY)).save_pretrained(out)
    AutoTokenizer.from_pretrained(TOK).save_pretrained(out)
    return out


def reference_completions(model_dir, questions, max_new):
    """Greedy completions by transformers itself, one prompt at a time, thinking block stripped by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                 eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(text.split("</think>")[-1].strip())
    return out


def test_exact_match_equals_transformers_reference(model_dir, tmp_path):
    answers = reference_completions(model_dir, QUESTIONS, MAX_NEW)
    # references: the model's own answer for the even records, a wrong one for the odd: accuracy 3/6
    rows = [{"question": q, "answer": a if i % 2 == 0 else a + " nope"} for i, (q, a) in enumerate(zip(QUESTIONS, answers))]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = xtune("eval", str(model_dir), f"eval.data.path={data}", "eval.scorer=exact", f"gen.max_new_tokens={MAX_NEW}",
                "gen.temperature=0", "gen.batch_size=4", "--out", str(tmp_path / "res"), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "res" / "eval" / "qa" / "summary.json").read_text())
    assert summary["metrics"] == {"accuracy": 0.5} and summary["samples"] == 6
    samples = [json.loads(x) for x in (tmp_path / "res" / "eval" / "qa" / "samples.jsonl").read_text().splitlines()]
    assert [s["score"] for s in samples] == [1.0, 0.0] * 3
    assert [s["reference"] for s in samples] == [r["answer"] for r in rows]
    assert [s["prompt"][-1]["content"] for s in samples] == QUESTIONS
    for s, a in zip(samples, answers):
        assert s["completion"].split("</think>")[-1].strip() == a
    for col in ("task", "metric", "value", "samples", "seconds"):
        assert col in out.stdout
    assert "qa" in out.stdout and "0.5000" in out.stdout


def test_user_scorer_and_multiple_choice(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "scorers").mkdir()
    (tmp_path / "scorers" / "myscore.py").write_text(
        "def length_ok(completion, reference, record):\n    return len(completion) <= int(reference)\n")
    data = tmp_path / "len.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "1000"}) + "\n" for q in QUESTIONS[:3]))
    out = xtune("eval", str(model_dir), f"eval.data.path={data}", "eval.scorer=myscore:length_ok",
                f"eval.scorer_path={tmp_path / 'scorers'}", "gen.max_new_tokens=4", "--out", str(tmp_path / "res"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "res/eval/len/summary.json").read_text())["metrics"] == {"score": 1.0}

    # multiple choice: the option transformers gives the highest log-likelihood after the rendered prompt
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    options = ["red", "blue", "green", "seven"]
    recs, want = [], []
    for i, q in enumerate(QUESTIONS[:4]):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        lls = []
        for opt in options:
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tok(opt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([p_ids + c_ids])).logits[0].float(), -1)
            lls.append(sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids)))
        best = max(range(4), key=lambda k: lls[k])
        answer = best if i < 3 else (best + 1) % 4  # 3 right, 1 wrong
        recs.append({"question": q, "choices": options, "answer": answer})
        want.append(lls)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = xtune("eval", str(model_dir), f"eval.data.path={data}", "eval.scorer=choice", "--out", str(tmp_path / "res"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "res/eval/mc/summary.json").read_text())["metrics"] == {"accuracy": 0.75}
    got = [json.loads(x)["loglikelihoods"] for x in (tmp_path / "res/eval/mc/samples.jsonl").read_text().splitlines()]
    assert [x for row in got for x in row] == pytest.approx([x for row in want for x in row], abs=1e-4)


def test_sweep_runs_each_point_on_one_loaded_model(model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS[:2]))
    args = ["eval", str(model_dir), "-m", f"eval.data.path={data}", "gen.max_new_tokens=2,5", "--out", str(tmp_path / "r")]
    dry = xtune(*args, "--dry-run")
    assert dry.returncode == 0 and "2 eval job(s) valid" in dry.stdout and not (tmp_path / "r").exists()
    out = xtune(*args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for n in (2, 5):
        rows = [json.loads(x) for x in (tmp_path / f"r/eval/qa[gen.max_new_tokens={n}]/samples.jsonl").read_text().splitlines()]
        summary = json.loads((tmp_path / f"r/eval/qa[gen.max_new_tokens={n}]/summary.json").read_text())
        assert summary["gen"]["max_new_tokens"] == n and len(rows) == 2
    assert out.stdout.count("Loading weights") <= 1 and out.stderr.count("Loading weights") <= 1


def test_thinking_is_stripped_before_scoring(tmp_path):
    """A demo model trained 40 steps opens its answers with think blocks (as the template trained it to); the
    scorer sees them removed. The user scorer here scores 1 for an answer without any think tag."""
    run = tmp_path / "run"
    out = xtune("sft", "recipe=demo", "train.max_steps=40", "train.eval_every=0", "train.save_every=0",
                "train.sample_prompts=[]", "train.eval_tasks=[]", "data.eval_datasets=[]", f"train.work_dir={run}",
                f"data.cache_dir={tmp_path / 'cache'}", "logging.tensorboard=false", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "evalh_nothink.py").write_text(
        "def no_think(completion, reference, record):\n    return '<think>' not in completion and '</think>' not in completion\n")
    scorer = ["eval=demo", "eval.limit=6", "eval.scorer=evalh_nothink:no_think", f"eval.scorer_path={tmp_path / 'sc'}"]
    for strip, want in (("true", 1.0), ("false", None)):
        res = xtune("eval", str(run), *scorer, f"eval.strip_thinking={strip}", f"eval.name=s{strip}")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        rows = [json.loads(x) for x in (run / "eval" / f"s{strip}" / "samples.jsonl").read_text().splitlines()]
        assert sum("<think>" in r["completion"] for r in rows) >= 3  # the raw completions have think blocks
        score = json.loads((run / "eval" / f"s{strip}" / "summary.json").read_text())["metrics"]["score"]
        assert score == want if want is not None else score < 1.0
