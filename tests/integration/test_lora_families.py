"""Adapters on every family, end to end on 2 ranks (FSDP2 over gloo) through `xtune sft`.

Each family's tiny model is saved in its original Hugging Face layout (as in test_model_families), then
`xtune sft peft=...` trains a few steps from it on 2 ranks. Checked against transformers and peft themselves:
  - the eval loss falls;
  - the checkpoint holds only the trained weights (the base is reloaded from load_from);
  - the base is untouched: every tensor of the merged export that has no adapter is bit-identical to the
    original folder, and each adapted weight equals the original plus scaling x B @ A of the saved adapter;
  - hf_adapter/ loads with PeftModel.from_pretrained over the original folder and gives the merged hf/ logits;
  - hf/ gives the logits of the trained checkpoint (read back alone).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.tiny import child_env
from tests.integration.test_model_families import fixed_inputs, make_original, safetensors_of, xtune_sft

STEPS = 3
# DoRA on 2 ranks is marked slow: tests/unit/test_tuning.py proves DoRA against peft's own DoRA, and the
# LoRA cases here the same FSDP2 path (DoRA differs only in the collective magnitude init).
# qwen3 LoRA on 2 ranks is slow here: the split-invariance test runs it on 2 ranks against peft, the LoRA
# resume test through the CLI; QLoRA covers this test's export path for qwen3.
CASES = [pytest.param("qwen3_tiny", "lora", marks=pytest.mark.slow), ("qwen3_moe_tiny", "lora"),
         ("intern_s1_tiny", "lora"), pytest.param("qwen3_tiny", "dora", marks=pytest.mark.slow),
         ("qwen3_tiny", "qlora")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _auto(model_name):
    import transformers

    if model_name == "intern_s1_tiny":
        return lambda path: transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    return lambda path: transformers.AutoModelForCausalLM.from_pretrained(str(path))


@pytest.mark.parametrize("model_name,method", CASES)
def test_adapters_train_on_two_ranks_and_export_for_peft(model_name, method, tmp_path, cache_dir):
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader

    from xtune.checkpoint.dcp import load_model_only
    from xtune.checkpoint.hf_export import build_plain_peft_model
    from xtune.config.io import spec_from_yaml
    from xtune.models import get_adapter

    orig = tmp_path / "orig"
    make_original(model_name, orig)
    initial = safetensors_of(orig)
    data = ["data=demo_vl"] if model_name == "intern_s1_tiny" else []
    run = tmp_path / "run"
    code, out = xtune_sft(
        ["recipe=demo", f"model={model_name}", *data, f"model.load_from={orig}", "model.tokenizer=null",
         "parallel=cpu2", f"peft={method}", "peft.r=8", "peft.alpha=16", "peft.dropout=0.0", "peft.modules_to_save=[]",
         f"train.max_steps={STEPS}", "train.global_batch_size=2", "train.save_every=0", f"train.eval_every={STEPS}",
         "train.log_every=1", "train.sample_prompts=[]", "data.pack_max_length=512", "data.sample_max_length=256",
         "optim.lr=1e-2", "sched=constant", "sched.warmup_ratio=0.0", "logging.tensorboard=false",
         f"data.cache_dir={cache_dir}"],
        run)
    assert code == 0, out[-5000:]
    assert "trainable parameters: " in out
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in recs if "eval_loss" in r}
    assert math.isfinite(evals[STEPS]) and evals[STEPS] < evals[0] - 0.01, evals

    ckpt = run / "checkpoints" / f"step-{STEPS}"
    saved = [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert saved and all(".lora_" in k for k in saved), saved[:5]

    adapter_dir, hf = run / "hf_adapter", run / "hf"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(orig) and cfg["use_dora"] == (method == "dora")
    adapters = safetensors_of_adapter(adapter_dir)
    merged = safetensors_of(hf)
    assert sorted(merged) == sorted(initial)
    adapted = {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] + ".weight"
               for k in adapters if ".lora_A." in k}
    assert adapted and adapted <= set(initial)
    untouched = [k for k in initial if k not in adapted]
    assert [k for k in untouched if not torch.equal(merged[k], initial[k])] == []
    if method == "lora":  # W' = W + (alpha / r) B A, with the original W
        for k in adapted:
            stem = "base_model.model." + k.removesuffix(".weight")
            delta = 2.0 * adapters[f"{stem}.lora_B.weight"] @ adapters[f"{stem}.lora_A.weight"]
            torch.testing.assert_close(merged[k], initial[k] + delta, atol=1e-6, rtol=1e-5, msg=k)
    assert any(not torch.equal(merged[k], initial[k]) for k in adapted), "the adapters did not train"

    load = _auto(model_name)
    inputs = fixed_inputs(model_name, json.loads((hf / "config.json").read_text()))
    spec = spec_from_yaml(run / "config.yaml")
    trained, _, _ = build_plain_peft_model(get_adapter(spec.model), spec)
    load_model_only(ckpt, trained, trainable_only=True)
    with torch.no_grad():
        merged_logits = load(hf).eval()(**inputs).logits
        torch.testing.assert_close(merged_logits, trained.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)
        peft_logits = PeftModel.from_pretrained(load(orig), str(adapter_dir)).eval()(**inputs).logits
        base_logits = load(orig).eval()(**inputs).logits
    if method == "qlora":  # peft over the full-precision original: close to, not equal to, the 4-bit model
        assert (peft_logits - merged_logits).abs().max() < 0.5
    else:
        torch.testing.assert_close(peft_logits, merged_logits, atol=1e-5, rtol=1e-5)
    assert (base_logits - merged_logits).abs().max() > 1e-3

    if (model_name, method) == ("qwen3_tiny", "lora"):  # `xtune export` rebuilds both folders from the checkpoint
        for flag, folder, name in (("--adapter-only", adapter_dir, "adapter_model.safetensors"),
                                   ("--merged", hf, "model.safetensors")):
            res = subprocess.run([sys.executable, "-m", "xtune", "export", str(ckpt), str(tmp_path / flag), flag],
                                 capture_output=True, text=True, timeout=300, env=child_env())
            assert res.returncode == 0, res.stderr[-3000:]
            a, b = load_file(str(tmp_path / flag / name)), load_file(str(folder / name))
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), flag


def safetensors_of_adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))
