"""Each model family from its ORIGINAL Hugging Face layout, end to end on 2 ranks.

For qwen3_tiny, qwen3_moe_tiny and intern_s1_tiny: a random model built by transformers itself is
saved in the layout of the real checkpoints (Qwen3 / Qwen3-MoE: what transformers' own
`save_pretrained` writes, per-expert `mlp.experts.N.*_proj` keys for MoE; Intern-S1: `interns1`
config + remote code, InternVL weight keys `model.language_model.*` / `model.vision_tower.*` /
`model.multi_modal_projector.*` / `lm_head.weight`), with the tokenizer beside it. xtune loads that
folder (`model.load_from`, tokenizer from it), trains a few steps on 2 ranks (`xtune sft`,
`parallel.nproc_per_node=2`, gloo), and exports `hf/`. Then:
  - transformers loads the export and its logits equal those of the trained DCP checkpoint;
  - the weights changed from the initial folder (training happened);
  - the export is a drop-in replacement: same weight keys, shapes and dtypes, same config.json,
    and every file of the original folder is there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOKENIZERS = ROOT / "src" / "xtune" / "assets" / "tokenizers"
STEPS = 3

# Stand-in for Intern-S1's remote code (the real modeling_interns1.py is not available offline).
# It states only what the adapter relies on: an `interns1` checkpoint is InternVL with other model
# types, the same config fields and the same weight keys. Loading the export through it is the
# documented path (`trust_remote_code=True`), with transformers' own InternVL doing the maths.
INTERNS1_CONFIG_PY = '''
from transformers import InternVLConfig, InternVLVisionConfig


class InternS1VisionConfig(InternVLVisionConfig):
    model_type = "interns1_vision"


class InternS1Config(InternVLConfig):
    model_type = "interns1"

    def __init__(self, vision_config=None, text_config=None, **kwargs):
        if isinstance(vision_config, dict):
            vision_config = InternVLVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        super().__init__(vision_config=vision_config, text_config=text_config, **kwargs)
'''
INTERNS1_MODELING_PY = '''
from transformers import InternVLForConditionalGeneration

from .configuration_interns1 import InternS1Config


class InternS1ForConditionalGeneration(InternVLForConditionalGeneration):
    config_class = InternS1Config
'''


def _tiny(name):
    """The architecture of conf/model/<name>.yaml: `model=<name> model.load_from=...` applies that group's
    `arch` on top of the folder's config.json, so the folder is built with the same values."""
    import yaml

    return copy.deepcopy(yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())["arch"])


def _save_tokenizer(tok_name, folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / tok_name))
    tok.save_pretrained(str(folder))
    return tok


def make_original(model_name, folder: Path):
    """A random tiny model built and saved by transformers in the family's original layout."""
    torch.manual_seed(1234)
    if model_name == "qwen3_tiny":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(**_tiny("qwen3_tiny")))
        model.save_pretrained(str(folder))
        _save_tokenizer("qwen3_tiny", folder)
    elif model_name == "qwen3_moe_tiny":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**_tiny("qwen3_moe_tiny")))
        model.save_pretrained(str(folder))
        _save_tokenizer("qwen3_tiny", folder)
    else:
        from safetensors.torch import save_file
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        folder.mkdir(parents=True)
        tok = _save_tokenizer("intern_s1_tiny", folder)
        config = InternVLConfig(image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                                tie_word_embeddings=False, **_tiny("intern_s1_tiny"))
        model = InternVLForConditionalGeneration(config)
        # Intern-S1's checkpoints hold the module names of transformers' InternVL model class.
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = config.to_dict()
        cfg.update(model_type="interns1", architectures=["InternS1ForConditionalGeneration"],
                   auto_map={"AutoConfig": "configuration_interns1.InternS1Config",
                             "AutoModelForCausalLM": "modeling_interns1.InternS1ForConditionalGeneration"})
        cfg.pop("transformers_version", None)
        cfg.pop("dtype", None)
        cfg["torch_dtype"] = "float32"  # Intern-S1's config.json spells it the transformers 4 way
        cfg["vision_config"]["model_type"] = "interns1_vision"
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        (folder / "configuration_interns1.py").write_text(INTERNS1_CONFIG_PY)
        (folder / "modeling_interns1.py").write_text(INTERNS1_MODELING_PY)
    return model


def safetensors_of(folder: Path) -> dict:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def xtune_sft(args, run_dir: Path, timeout=150):
    """`python -m xtune sft ...` in its own session: a hang is killed (all workers) and reported."""
    return xtune_cli(["sft", *args, f"train.work_dir={run_dir}"], timeout)


def xtune_cli(args, timeout=150, env=None):
    """`python -m xtune <args>` in its own session (extra environment `env`); returns (exit code, output)."""
    from tests.distributed.tiny import child_env

    cmd = [sys.executable, "-m", "xtune", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"xtune {args[0]} did not finish within {timeout}s (hang?):\n{out[-4000:]}")
    return proc.returncode, out


def train_records(run_dir: Path) -> list:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def two_rank_args(steps: int, cache_dir) -> list:
    """The demo recipe on 2 ranks for `steps` steps, logging every step, exporting only at the end."""
    return ["recipe=demo", "parallel=cpu2", f"train.max_steps={steps}", "train.global_batch_size=4",
            "train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.sample_prompts=[]",
            "data.eval_datasets=[]", "data.pack_max_length=512", "data.sample_max_length=256",
            "optim.lr=1e-3", "sched=constant", "sched.warmup_ratio=0.0", "logging.tensorboard=false",
            f"data.cache_dir={cache_dir}"]


def assert_trained(run_dir: Path, code: int, out: str, steps: int) -> None:
    """The run succeeded and logged a finite, positive loss at every step."""
    assert code == 0, out[-5000:]
    recs = train_records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)


def fixed_inputs(model_name, config_json):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 4000, (1, 24), generator=g)
    if model_name != "intern_s1_tiny":
        return {"input_ids": ids}
    ids[0, 2:10] = config_json["image_token_id"]  # two 56 px tiles x 4 tokens
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 56, 56, generator=g)}


# qwen3 from a folder on 2 ranks is slow here: QLoRA (test_lora_families.py) and the auto family run that path.
FAMILIES = [pytest.param("qwen3_tiny", marks=pytest.mark.slow), "qwen3_moe_tiny", "intern_s1_tiny"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.mark.parametrize("model_name", FAMILIES)
def test_original_layout_trains_on_two_ranks_and_exports_a_drop_in(model_name, tmp_path, cache_dir):
    import transformers

    from xtune.checkpoint.dcp import load_model_only
    from xtune.checkpoint.hf_export import build_plain_model
    from xtune.config.io import spec_from_yaml
    from xtune.models import get_adapter

    orig = tmp_path / "orig"
    make_original(model_name, orig)
    initial = safetensors_of(orig)
    if model_name == "qwen3_moe_tiny":  # what transformers writes for the real Qwen3-MoE checkpoints
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in initial
        assert not any("gate_up_proj" in k for k in initial)
    if model_name == "intern_s1_tiny":
        assert {k.split(".")[0] + "." + k.split(".")[1] for k in initial if k.startswith("model.")} == {
            "model.language_model", "model.vision_tower", "model.multi_modal_projector"}

    # The bundled chat tasks for the language models; the bundled image + text mix for Intern-S1.
    data = ["data=demo_vl"] if model_name == "intern_s1_tiny" else []
    run = tmp_path / "run"
    code, out = xtune_sft([f"model={model_name}", *data, f"model.load_from={orig}", "model.tokenizer=null",
                           *two_rank_args(STEPS, cache_dir)], run)
    assert_trained(run, code, out, STEPS)

    spec = spec_from_yaml(run / "config.yaml")
    assert spec.parallel.nproc_per_node == 2 and spec.model.load_from == str(orig)
    hf = run / "hf"

    # 1. Drop-in: same keys / shapes / dtypes, same config.json, every original file present.
    exported = safetensors_of(hf)
    assert sorted(exported) == sorted(initial)
    assert all(exported[k].shape == initial[k].shape and exported[k].dtype == initial[k].dtype for k in initial)
    cfg_orig = json.loads((orig / "config.json").read_text())
    cfg_hf = json.loads((hf / "config.json").read_text())
    assert {k: v for k, v in cfg_hf.items() if k in cfg_orig} == cfg_orig, "original config.json values changed"
    auto_kw = {"trust_remote_code": True} if model_name == "intern_s1_tiny" else {}

    def loaded_config(folder):
        d = transformers.AutoConfig.from_pretrained(str(folder), **auto_kw).to_dict()
        d.pop("_name_or_path", None)
        return d

    assert loaded_config(hf) == loaded_config(orig)
    missing = sorted(p.name for p in orig.iterdir() if not (hf / p.name).exists())
    assert not missing, f"files of the original folder missing from the export: {missing}"

    # 2. Training happened: every tensor moved (AdamW moves any parameter with a gradient; lr 1e-3, 3 steps).
    unchanged = sorted(k for k in initial if torch.equal(exported[k], initial[k]))
    assert not unchanged, f"{len(unchanged)} tensors identical to the initial folder, e.g. {unchanged[:5]}"

    # 3. The export loads in transformers with the logits of the trained checkpoint (read back alone).
    ckpt = run / "checkpoints" / f"step-{STEPS}"
    model, _ = build_plain_model(get_adapter(spec.model), spec)
    load_model_only(ckpt, model)
    cfg = json.loads((hf / "config.json").read_text())
    inputs = fixed_inputs(model_name, cfg)
    if model_name == "intern_s1_tiny":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True)
        assert type(loaded).__name__ == "InternS1ForConditionalGeneration"
    else:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(hf))
    with torch.no_grad():
        want = model.eval()(**inputs).logits
        got = loaded.eval()(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the loaded model differs from the initial one on that input (so the comparison can fail)
    with torch.no_grad():
        if model_name == "intern_s1_tiny":
            init_model = transformers.AutoModelForCausalLM.from_pretrained(str(orig), trust_remote_code=True)
        else:
            init_model = transformers.AutoModelForCausalLM.from_pretrained(str(orig))
        before = init_model.eval()(**inputs).logits
    assert (before - got).abs().max().item() > 1e-3

    # 4. `xtune export` of the checkpoint (in this process, no process group) rebuilds the run's hf/.
    from typer.testing import CliRunner

    from xtune.cli import app

    res = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "exported")])
    assert res.exit_code == 0, res.output
    again = safetensors_of(tmp_path / "exported")
    assert sorted(again) == sorted(exported) and all(torch.equal(again[k], exported[k]) for k in exported)
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == sorted(p.name for p in hf.iterdir())
    assert json.loads((tmp_path / "exported" / "config.json").read_text()) == cfg


def test_intern_s1_reads_and_rewrites_transformers_own_internvl_folder(tmp_path):
    """transformers' InternVL `save_pretrained` writes the older key names (`language_model.model.*`,
    `vision_tower.*`, ...): xtune reads that folder into the model's weights and an export keeps those
    names, loading back in transformers with the same logits. (No training: the adapter alone.)"""
    from transformers import AutoModelForImageTextToText, InternVLConfig, InternVLForConditionalGeneration

    from xtune.config.schema import ModelSpec
    from xtune.models import get_adapter

    torch.manual_seed(5)
    tok = _save_tokenizer("intern_s1_tiny", tmp_path / "orig")
    config = InternVLConfig(image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), tie_word_embeddings=False,
                            **_tiny("intern_s1_tiny"))
    model = InternVLForConditionalGeneration(config).eval()
    model.save_pretrained(str(tmp_path / "orig"))
    initial = safetensors_of(tmp_path / "orig")
    assert "language_model.model.embed_tokens.weight" in initial  # the older names, as transformers writes them

    adapter = get_adapter(ModelSpec(family="intern_s1", load_from=str(tmp_path / "orig")))
    sd = adapter.read_hf_state_dict(tmp_path / "orig")
    own = model.state_dict()
    assert sorted(sd) == sorted(own) and all(torch.equal(sd[k], own[k]) for k in own)

    out = adapter.save_hf(sd, adapter.build_config(), adapter.load_tokenizer(), tmp_path / "export")
    exported = safetensors_of(out)
    assert sorted(exported) == sorted(initial) and all(torch.equal(exported[k], initial[k]) for k in initial)
    inputs = fixed_inputs("intern_s1_tiny", {"image_token_id": config.image_token_id})
    with torch.no_grad():
        got = AutoModelForImageTextToText.from_pretrained(str(out)).eval()(**inputs).logits
        torch.testing.assert_close(got, model(**inputs).logits, atol=1e-5, rtol=0)
