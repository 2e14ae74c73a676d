"""The `auto` family from folders that transformers' own `save_pretrained` wrote (tiny random models of
the supported model types, the shipped Qwen3 tiny tokenizer with its chat template beside them).

- `model=auto model.load_from=...` picks the family from config.json, and the loaded model gives the
  logits of `from_pretrained` on the same folder (weights, rotary tables, tied lm_head).
- 2 ranks (FSDP2 over gloo): train, export with identical key names, and `from_pretrained` of the export
  gives the trained checkpoint's logits; a tied model keeps its tie through training and export.
- A model type that cannot be packed safely is refused before launch with exit 2 and the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.test_model_families import ROOT, _save_tokenizer, assert_trained, safetensors_of, two_rank_args, xtune_sft
from xtune.models.tiny import AUTO_TINY

STEPS = 3


def make_auto_original(model_type: str, folder: Path, **overrides):
    """A tiny random folder. `gemma3` is the multimodal Gemma 3 (a tiny SigLIP vision tower and projector
    around the gemma3_text language model), saved as transformers writes the hub checkpoints."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1234)
    if model_type == "gemma3":
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)
        config = AutoConfig.for_model("gemma3", text_config={**AUTO_TINY["gemma3_text"], **overrides},
                                      vision_config=vision, mm_tokens_per_image=4, **overrides)
    else:
        config = AutoConfig.for_model(**{**AUTO_TINY[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder))
    _save_tokenizer("qwen3_tiny", folder)
    return model


def _inputs():
    return {"input_ids": torch.randint(0, 4000, (1, 24), generator=torch.Generator().manual_seed(7))}


@pytest.mark.parametrize("model_type,family", [("gemma3_text", "auto"), ("gemma3", "auto"), ("phi3", "auto"),
                                               ("llama", "auto"), ("qwen3", "qwen3")])
def test_loaded_folder_gives_transformers_logits(model_type, family, tmp_path, monkeypatch):
    """Single process (a plain module: no FSDP). A tied Qwen3 (like Qwen3-0.6B..4B) goes to the tuned
    family, whose load path re-ties the head that `to_empty` separated."""
    from transformers import AutoModelForCausalLM

    from xtune.config.compose import load_spec
    from xtune.models import get_adapter
    from xtune.parallel.distributed import init_distributed
    from xtune.parallel.fsdp import build_sharded

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_auto_original(model_type, tmp_path / "orig", tie_word_embeddings=True)
    _, spec = load_spec(["recipe=demo", "model=auto", f"model.load_from={tmp_path / 'orig'}", "train.max_steps=1",
                         "train.global_batch_size=1"])
    assert spec.model.family == family
    adapter = get_adapter(spec.model)
    assert adapter.validate() == []
    denv = init_distributed(spec.parallel)
    try:
        model, _, _ = build_sharded(adapter, spec, denv, "sdpa", lambda m, _impl: m)
        with torch.no_grad():
            got = model.eval()(**_inputs()).logits
    finally:
        denv.close()
    assert adapter.output_weight(model) is model.get_input_embeddings().weight
    want = AutoModelForCausalLM.from_pretrained(str(tmp_path / "orig")).eval()(**_inputs()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# mistral on 2 ranks is slow: gemma3 covers sliding-window layers (and a tied head) on the same path.
@pytest.mark.parametrize("model_type", ["gemma3", pytest.param("mistral", marks=pytest.mark.slow)])
def test_auto_trains_on_two_ranks_and_exports_a_drop_in(model_type, tmp_path):
    """gemma3 is the multimodal folder: its language model (gemma3_text, tied, sliding windows) is trained
    and the export is the multimodal folder again, the vision tower and projector unchanged."""
    import transformers

    from xtune.checkpoint.dcp import load_model_only
    from xtune.checkpoint.hf_export import build_plain_model
    from xtune.config.io import spec_from_yaml
    from xtune.models import get_adapter

    orig = tmp_path / "orig"
    make_auto_original(model_type, orig)
    tied = AUTO_TINY["gemma3_text" if model_type == "gemma3" else model_type]["tie_word_embeddings"]
    initial = safetensors_of(orig)
    assert ("lm_head.weight" in initial) != tied  # transformers writes a tied head once

    run = tmp_path / "run"
    code, out = xtune_sft(["model=auto", f"model.load_from={orig}", *two_rank_args(STEPS, tmp_path / "c")], run)
    assert_trained(run, code, out, STEPS)
    spec = spec_from_yaml(run / "config.yaml")
    assert spec.model.family == "auto" and spec.parallel.nproc_per_node == 2

    # Drop-in: the same keys (no lm_head when tied), shapes and dtypes; every tensor trained.
    hf = run / "hf"
    exported = safetensors_of(hf)
    assert sorted(exported) == sorted(initial)
    assert all(exported[k].shape == initial[k].shape and exported[k].dtype == initial[k].dtype for k in initial)
    unchanged = sorted(k for k in initial if torch.equal(exported[k], initial[k]))
    not_text = sorted(k for k in initial if not k.startswith("language_model.")) if model_type == "gemma3" else []
    assert unchanged == not_text, f"{len(unchanged)} tensors identical to the initial folder, e.g. {unchanged[:5]}"
    if model_type == "gemma3":
        assert len(not_text) > 4  # the vision tower and projector came through
    cfg_orig = json.loads((orig / "config.json").read_text())
    cfg_hf = json.loads((hf / "config.json").read_text())
    assert {k: v for k, v in cfg_hf.items() if k in cfg_orig} == cfg_orig

    # The export loads in transformers with the trained checkpoint's logits; a tie survives both.
    model, _ = build_plain_model(get_adapter(spec.model), spec)
    load_model_only(run / "checkpoints" / f"step-{STEPS}", model)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    if tied:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
        assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        want = model.eval()(**_inputs()).logits
        got = loaded(**_inputs()).logits
        before = transformers.AutoModelForCausalLM.from_pretrained(str(orig)).eval()(**_inputs()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (before - got).abs().max().item() > 1e-3


def test_unsafe_model_type_is_refused_before_launch(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    folder = tmp_path / "gemma2"
    Gemma2ForCausalLM(Gemma2Config(**{k: v for k, v in AUTO_TINY["gemma3_text"].items()
                                      if k not in ("model_type", "layer_types")})).save_pretrained(str(folder))
    _save_tokenizer("qwen3_tiny", folder)
    proc = subprocess.run([sys.executable, "-m", "xtune", "sft", "recipe=demo", "model=auto",
                           f"model.load_from={folder}", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "model_type gemma2 cannot be trained packed safely" in out and "Traceback" not in out
