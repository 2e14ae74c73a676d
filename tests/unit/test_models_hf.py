"""HF folders: export -> transformers from_pretrained gives the same logits; reading folders written by
transformers' own save_pretrained; meta build + init; freezing; errors that name the path."""

import json

import pytest
import torch

from xtune.config.schema import ModelSpec
from xtune.errors import XtuneError
from xtune.models import get_adapter
from xtune.models.tiny import INTERN_S1_TINY, QWEN3_MOE_TINY, QWEN3_TINY

SPECS = {
    "qwen3": ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=QWEN3_TINY),
    "qwen3_moe": ModelSpec(family="qwen3_moe", tokenizer="builtin:qwen3_tiny", arch=QWEN3_MOE_TINY),
    "intern_s1": ModelSpec(family="intern_s1", tokenizer="builtin:intern_s1_tiny", arch=INTERN_S1_TINY),
}


def _meta_built(adapter, seed=0):
    """The engine's path: meta build -> to_empty -> init_weights."""
    config = adapter.build_config()
    with torch.device("meta"):
        model = adapter.build_model(config, "sdpa")
    model = model.to_empty(device="cpu")
    torch.manual_seed(seed)
    adapter.init_weights(model)
    return config, model.eval()


def _inputs(model, with_image):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3000, (1, 20), generator=g)
    if not with_image:
        return {"input_ids": ids}
    ids[0, 3:11] = model.config.image_token_id
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 56, 56, generator=g)}


def _auto(adapter):
    import transformers

    return getattr(transformers, adapter.auto_class)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "intern_s1"])
def test_export_loads_in_transformers_with_same_logits(family, tmp_path):
    adapter = get_adapter(SPECS[family])
    config, model = _meta_built(adapter)
    tokenizer = adapter.load_tokenizer()
    out = adapter.save_hf(model.state_dict(), config, tokenizer, tmp_path / "hf", max_shard_bytes=1 << 20)

    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "generation_config.json").is_file()
    loaded = _auto(adapter).from_pretrained(str(out), local_files_only=True).eval()
    inputs = _inputs(model, family == "intern_s1")
    with torch.no_grad():
        assert (model(**inputs).logits - loaded(**inputs).logits).abs().max().item() <= 1e-5
    # The tokenizer (with its chat template) comes along.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == tokenizer.apply_chat_template(msgs, tokenize=False)
    # Reading the export back gives the model's own state dict.
    back = adapter.read_hf_state_dict(out)
    own = model.state_dict()
    assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own)


def test_moe_export_uses_per_expert_layout(tmp_path):
    adapter = get_adapter(SPECS["qwen3_moe"])
    config, model = _meta_built(adapter)
    out = adapter.save_hf(model.state_dict(), config, None, tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_reads_folder_written_by_transformers_save_pretrained(family, tmp_path):
    adapter = get_adapter(SPECS[family])
    config, model = _meta_built(adapter, seed=1)
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="300KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    sd = adapter.read_hf_state_dict(tmp_path / "hf")
    own = model.state_dict()
    assert set(sd) == set(own) and all(torch.equal(sd[k], own[k]) for k in own)
    # and load_from that folder builds the same config
    spec = ModelSpec(family=family, load_from=str(tmp_path / "hf"), tokenizer="builtin:qwen3_tiny")
    built = get_adapter(spec).build_config()
    assert built.num_hidden_layers == config.num_hidden_layers and built.vocab_size == config.vocab_size


def _to_interns1_layout(folder):
    """Rewrite a transformers InternVL export into Intern-S1's original (remote-code) config layout."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "interns1"
    cfg["architectures"] = ["InternS1ForConditionalGeneration"]
    cfg["auto_map"] = {"AutoConfig": "configuration_interns1.InternS1Config",
                       "AutoModelForCausalLM": "modeling_interns1.InternS1ForConditionalGeneration"}
    cfg["vision_config"]["model_type"] = "interns1_vision"
    cfg["vision_config"]["drop_path_rate"] = 0.0
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_interns1.py").write_text("# remote code placeholder\n")


def test_intern_s1_original_layout_round_trip(tmp_path):
    adapter = get_adapter(SPECS["intern_s1"])
    config, model = _meta_built(adapter)
    src = adapter.save_hf(model.state_dict(), config, adapter.load_tokenizer(), tmp_path / "orig")
    _to_interns1_layout(src)

    # (the tokenizer is named explicitly: the placeholder remote code above cannot build a config)
    spec = ModelSpec(family="intern_s1", load_from=str(src), tokenizer="builtin:intern_s1_tiny",
                     arch={"vision_config": {"num_hidden_layers": 2}})
    s1 = get_adapter(spec)
    assert s1.validate() == []
    cfg = s1.build_config()
    reloaded = s1.build_model(cfg, "sdpa").eval()
    reloaded.load_state_dict(s1.read_hf_state_dict(src), strict=True)
    inputs = _inputs(model, True)
    with torch.no_grad():  # transformers' InternVL class on the original folder's weights
        assert (model(**inputs).logits - reloaded(**inputs).logits).abs().max().item() <= 1e-5

    # shifted so that an export copying the source folder's weights cannot pass
    trained = {k: v + 1 if v.is_floating_point() else v for k, v in reloaded.state_dict().items()}
    out = s1.save_hf(trained, cfg, s1.load_tokenizer(), tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "interns1" and written["vision_config"]["model_type"] == "interns1_vision"
    assert written["auto_map"]["AutoConfig"] == "configuration_interns1.InternS1Config"
    assert (out / "configuration_interns1.py").is_file()  # remote code travels with the export
    orig, back = s1.read_original_state_dict(src), s1.read_original_state_dict(out)
    assert sorted(back) == sorted(orig)  # the original key names
    for k in orig:  # and each tensor is the model's, in its dtype
        assert back[k].dtype == orig[k].dtype and torch.equal(back[k], orig[k] + 1 if orig[k].is_floating_point() else orig[k]), k


def test_meta_init_is_deterministic_and_buffers_reset():
    adapter = get_adapter(SPECS["qwen3"])
    _, a = _meta_built(adapter, seed=5)
    _, b = _meta_built(adapter, seed=5)
    _, c = _meta_built(adapter, seed=6)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert abs(a.state_dict()[w].std().item() - a.config.initializer_range) < 0.005
    torch.manual_seed(0)
    reference = adapter.build_model(adapter.build_config(), "sdpa")  # built eagerly by transformers
    with torch.device("meta"):
        m = adapter.build_model(adapter.build_config(), "sdpa")
    m = m.to_empty(device="cpu")
    adapter.reset_buffers(m)
    assert torch.equal(m.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_freeze_flags():
    spec = ModelSpec(family="intern_s1", tokenizer="builtin:intern_s1_tiny", arch=INTERN_S1_TINY,
                     freeze_vision=True, freeze_projector=True)
    adapter = get_adapter(spec)
    model = adapter.build_model(adapter.build_config(), "sdpa")
    adapter.apply_freeze(model)
    for name, p in model.named_parameters():
        frozen = name.startswith(("model.vision_tower", "model.multi_modal_projector"))
        assert p.requires_grad != frozen, name
    lang = get_adapter(ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny", arch=QWEN3_TINY, freeze_language=True))
    m = lang.build_model(lang.build_config(), "sdpa")
    lang.apply_freeze(m)
    assert not any(p.requires_grad for p in m.parameters())


def test_blocks_cover_decoder_and_vision_layers():
    adapter = get_adapter(SPECS["intern_s1"])
    model = adapter.build_model(adapter.build_config(), "sdpa")
    names = {type(b).__name__ for b in adapter.blocks(model)}
    assert names == {"InternVLVisionLayer", "Qwen3DecoderLayer"} and len(adapter.blocks(model)) == 4


def test_errors_name_the_path(tmp_path):
    adapter = get_adapter(SPECS["qwen3"])
    with pytest.raises(XtuneError, match=str(tmp_path / "nope")):
        adapter.read_hf_state_dict(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    with pytest.raises(XtuneError, match="x.safetensors"):
        adapter.read_hf_state_dict(tmp_path / "m")
    problems = get_adapter(ModelSpec(family="qwen3", load_from=str(tmp_path / "m"))).validate()
    assert any("config.json" in p for p in problems) and any("tokenizer" in p for p in problems)
    bad_tok = get_adapter(ModelSpec(family="qwen3", tokenizer=str(tmp_path), arch=QWEN3_TINY))
    with pytest.raises(XtuneError, match=str(tmp_path)):
        bad_tok.load_tokenizer()
    with pytest.raises(XtuneError, match="family"):
        get_adapter(ModelSpec(family="llama"))
