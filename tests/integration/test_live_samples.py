"""train.sample_every on 2 ranks (FSDP2): samples from the live model at step 2 equal greedy generation by plain
transformers from the step-2 checkpoint, rebuilt independently; they go to samples.jsonl (with step), the log
(one readable line each) and TensorBoard text. And the display of a sample: one line, cut, never blank."""

import json

import torch

from tests.integration.test_model_families import two_rank_args, xtune_cli
from xtune.engine.samples import display

PROMPTS = ["What is 2 + 3?", "Name a colour."]


def test_live_samples_on_two_ranks_match_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [a for a in two_rank_args(4, tmp_path / "cache")
            if not a.startswith(("train.sample_prompts", "train.save_every", "logging.tensorboard", "optim.lr"))]
    code, out = xtune_cli(["sft", *args, f"train.work_dir={run}", "train.sample_every=2", "train.save_every=2",
                           "train.sample_max_new_tokens=8", f"train.sample_prompts=[{PROMPTS[0]!r},{PROMPTS[1]!r}]",
                           "logging.tensorboard=true", "logging.progress=plain",
                           # a small LR keeps the answers varied (a few steps at 1e-3, or at 2e-4 from the
                           # world-size-independent init, answer only newlines)
                           "optim.lr=5e-5"], timeout=400)
    assert code == 0, out[-4000:]
    recs = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in recs] == [(2, PROMPTS[0]), (2, PROMPTS[1]), (4, PROMPTS[0]), (4, PROMPTS[1])]
    assert not (run / ".samples-hf").exists()

    from xtune.checkpoint.dcp import load_model_only
    from xtune.checkpoint.hf_export import build_plain_model
    from xtune.config.io import spec_from_yaml
    from xtune.models import get_adapter

    spec = spec_from_yaml(run / "config.yaml")
    adapter = get_adapter(spec.model)
    tok = adapter.load_tokenizer()
    model, _ = build_plain_model(adapter, spec)
    load_model_only(run / "checkpoints" / "step-2", model)
    model.eval()
    for rec in recs[:2]:
        ids = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True,
                                      enable_thinking=False, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)
        want = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        assert rec["completion"] == want
        assert f"sample @ step 2> {rec['prompt']} -> {display(want)}" in out
    # The comparison can fail: the model changed between the two sample steps, and so did its answers.
    assert [r["completion"] for r in recs[:2]] != [r["completion"] for r in recs[2:]]
    assert any(r["completion"].strip() for r in recs[:2]), recs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {(e.step, tag): e.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]
             for e in acc.Tensors(tag) if tag.startswith("samples/")}
    assert texts[(2, "samples/0/text_summary")] == f"**{PROMPTS[0]}**\n\n{recs[0]['completion']}"
    assert texts[(4, "samples/1/text_summary")] == f"**{PROMPTS[1]}**\n\n{recs[3]['completion']}"


def test_display_is_one_readable_line():
    assert display("\n" * 30) == "(empty)"
    assert display("  \n \t ") == "(empty)"
    assert display("first line\n\n\nsecond   line\n") == "first line ⏎ second line"
    long = display("word " * 100, limit=40)
    assert len(long) == 40 and long.endswith("…") and "\n" not in long
    assert display("short") == "short"
