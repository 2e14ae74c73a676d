"""`xtune chat` and run directories, on a demo run trained here for a few steps (`xtune.methods.train`).

- A run directory generates from its hf/ export; with the export gone, from its newest checkpoint built in memory
  (nothing written): the same greedy completions, equal to transformers' generate on the export.
- An adapter run (peft=lora, merge_on_export=false): its hf_adapter/ folder and its checkpoint give the same
  completions as peft's PeftModel over the base. A QLoRA run: its checkpoint (NF4 base) answers as its merged export.
- `echo PROMPT | xtune chat RUN` and `xtune chat RUN --prompt PROMPT` print the answer (the engine's greedy
  completion) and exit 0; bad paths exit 2 with one message naming the path and what was expected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed.tiny import child_env
from tests.integration.test_model_families import ROOT
from xtune.config.schema import GenSpec
from xtune.generate import Generator

PROMPTS = ["What is the capital of France?", "Sort from smallest to largest: 7 2 9 4"]


def _train(run_dir, cache, *extra):
    from xtune.config.compose import load_spec
    from xtune.methods import train

    _, spec = load_spec(["recipe=demo", "train.max_steps=4", "train.save_every=2", "train.eval_every=0",
                         "train.sample_prompts=[]", "data.eval_datasets=[]", "data.pack_max_length=512",
                         "data.sample_max_length=256", "logging.tensorboard=false", f"data.cache_dir={cache}",
                         f"train.work_dir={run_dir}", *extra])
    train(spec, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return _train(root / "run", root / "cache")


def _chat(args, stdin=None, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "xtune", "chat", *args], cwd=ROOT, env=child_env(), input=stdin,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_run_dir_export_and_checkpoint_give_transformers_greedy(run, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = GenSpec(max_new_tokens=10)
    from_export = Generator.from_path(run).generate(PROMPTS, spec)
    ref = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    tok = Generator.from_path(run / "hf").tokenizer
    for prompt, (c,) in zip(PROMPTS, from_export):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                               eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        assert c.token_ids == out[0, ids.shape[1]:].tolist()
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("hf"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    gen = Generator.from_path(copy)
    assert "checkpoint step-4" in gen.source
    assert gen.generate(PROMPTS, spec) == from_export
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before  # nothing written


def test_adapter_run_folder_and_checkpoint_equal_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _train(tmp_path / "lora", tmp_path / "cache", "peft=lora", "peft.merge_on_export=false")
    assert (run / "hf_adapter" / "adapter_config.json").is_file() and not (run / "hf").exists()
    spec = GenSpec(max_new_tokens=10)
    got = Generator.from_path(run).generate(PROMPTS, spec)
    base = json.loads((run / "hf_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "hf_adapter")).eval()
    tok = Generator.from_path(run / "hf_adapter").tokenizer
    for prompt, (c,) in zip(PROMPTS, got):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=10, eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        assert c.token_ids == out[0, ids.shape[1]:].tolist()
    shutil.rmtree(run / "hf_adapter")
    assert Generator.from_path(run).generate(PROMPTS, spec) == got  # the checkpoint, adapters injected


def test_qlora_run_checkpoint_generates_like_its_merged_export(tmp_path):
    """QLoRA: the checkpoint built in memory (NF4 base, adapters injected, as trained) answers as the merged export
    peft wrote (base dequantized, adapters merged)."""
    run = _train(tmp_path / "qlora", tmp_path / "cache", "peft=qlora")
    spec = GenSpec(max_new_tokens=10)
    got = Generator.from_path(run).generate(PROMPTS, spec)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("hf", "hf_adapter"))
    gen = Generator.from_path(copy)
    assert "checkpoint" in gen.source
    from xtune.peft.quant import is_nf4

    assert any(is_nf4(p) for p in gen.model.parameters())
    assert gen.generate(PROMPTS, spec) == got


def test_chat_over_a_pipe_and_with_prompt(run):
    want = Generator.from_path(run).generate([PROMPTS[1]], GenSpec(max_new_tokens=12))[0][0].text
    code, out, err = _chat([str(run), "gen.max_new_tokens=12"], stdin=PROMPTS[1] + "\n")
    assert code == 0, err[-3000:]
    assert out == want + "\n"
    code, out, err = _chat([str(run), "--prompt", PROMPTS[1], "--max-new-tokens", "12"])
    assert code == 0, err[-3000:]
    assert out == want + "\n"


def test_chat_bad_paths_exit_2(run, tmp_path):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text((run / "config.yaml").read_text())
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/no/base"}))
    cases = [(tmp_path / "missing", "no such file or folder; expected a run directory"),
             (tmp_path / "fresh", "run directory with no checkpoint yet"),
             (tmp_path / "adapter", "base model /no/base (base_model_name_or_path in adapter_config.json) is not here")]
    for path, fragment in cases:
        code, out, err = _chat([str(path), "--prompt", "hi"])
        assert code == 2, (path, out, err)
        assert fragment in " ".join(err.split()) and "Traceback" not in err
