"""End-of-run samples from an export in Intern-S1's original `interns1` layout (remote-code config, no
image-text class in its auto_map): xtune generates with transformers' native InternVL class and runs no
code from the folder. Reference: the same export loaded the way its config documents, through its
remote code (the test's stand-in InternS1 classes from test_model_families), generating greedily."""

from __future__ import annotations

import json

import torch

from tests.integration.test_model_families import make_original
from xtune.config.schema import ModelSpec
from xtune.engine.samples import generate_samples
from xtune.models import get_adapter

PROMPTS = ["What is 2 + 3?", "Name a colour."]


def test_samples_from_an_interns1_layout_export(tmp_path):
    import transformers

    orig = tmp_path / "orig"
    make_original("intern_s1_tiny", orig)
    adapter = get_adapter(ModelSpec(name="s1", family="intern_s1", load_from=str(orig)))
    tok = adapter.load_tokenizer()
    hf = adapter.save_hf(adapter.read_hf_state_dict(orig), adapter.build_config(), tok, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "interns1" and "AutoModelForImageTextToText" not in cfg["auto_map"]
    assert (hf / "modeling_interns1.py").is_file()

    out_file = tmp_path / "samples.jsonl"
    got = generate_samples(adapter, tok, hf, PROMPTS, 12, step=3, out_file=out_file, log=lambda _: None)
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == got
    assert [r["prompt"] for r in got] == PROMPTS and all(r["step"] == 3 for r in got)

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True).eval()
    assert type(reference).__name__ == "InternS1ForConditionalGeneration"
    for prompt, rec in zip(PROMPTS, got):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      enable_thinking=False, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        want = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        assert rec["completion"] == want and want  # random weights: some text, the same text
