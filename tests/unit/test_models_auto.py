"""The generic `auto` family (transformers' Auto classes) on the tiny models of every supported model type.

Invariant 1 (packing is invisible) for each of them, against the unmodified transformers forward of
each document alone; then block / output discovery, family detection from config.json, and refusals.
"""

import json

import pytest
import torch

from tests.unit.test_models_packing import _compare, _doc, _pack, _packed, _reference
from xtune.config.families import AUTO_MODEL_TYPES, TUNED_MODEL_TYPES, detect_family, family_problems
from xtune.config.schema import CHOICES, ModelSpec
from xtune.models import get_adapter
from xtune.models.auto import AutoAdapter
from xtune.models.tiny import AUTO_TINY

TOKENIZER = "builtin:qwen3_tiny"


def _adapter(model_type, **kw):
    return get_adapter(ModelSpec(family="auto", tokenizer=TOKENIZER, arch=AUTO_TINY[model_type], **kw))


def test_every_supported_model_type_has_a_tiny_model_here():
    from xtune.models.auto import TEXT_PART_PREFIXES

    # A multimodal type is trained as its text model (gemma3 -> gemma3_text), tested under that name.
    assert set(AUTO_MODEL_TYPES) - set(TEXT_PART_PREFIXES) == set(AUTO_TINY)
    assert set(TUNED_MODEL_TYPES) | {"auto"} == set(CHOICES["model.family"])


@pytest.mark.parametrize("model_type,impl", [(t, "sdpa") for t in AUTO_TINY] + [
    ("mistral", "eager"), ("gemma3_text", "eager"), ("llama", "eager")])
def test_packed_equals_unpacked(model_type, impl):
    adapter = _adapter(model_type)
    assert isinstance(adapter, AutoAdapter)
    torch.manual_seed(0)
    model = adapter.build_model(adapter.build_config(), impl)
    assert type(model).__name__.endswith("ForCausalLM")
    g = torch.Generator().manual_seed(1)
    docs = [_doc(g, 9), _doc(g, 14), _doc(g, 11)]  # longer than the 6-token sliding windows
    ref = _reference(model, docs, None)
    per_token, grads, aux = _packed(adapter, model, _pack(docs), impl)
    _compare(ref, (per_token, grads))
    assert aux is None


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_tied_output_projection_is_the_input_embedding(model_type):
    adapter = _adapter(model_type)
    model = adapter.build_model(adapter.build_config(), "sdpa")
    assert adapter.output_weight(model) is model.get_input_embeddings().weight


def test_blocks_found_by_class_and_by_layer_list():
    adapter = _adapter("llama")
    model = adapter.build_model(adapter.build_config(), "sdpa")
    blocks = adapter.blocks(model)
    assert blocks == list(model.model.layers) and len(blocks) == AUTO_TINY["llama"]["num_hidden_layers"]
    # Wrapping a block's linear layers (what peft does) does not change what is found.
    attn = blocks[0].self_attn
    attn.q_proj = torch.nn.Sequential(attn.q_proj)
    assert adapter.blocks(model) == blocks
    # Without _no_split_modules the decoder's layer list is used.
    model._no_split_modules = None
    assert adapter.blocks(model) == blocks


def test_model_without_blocks_is_refused():
    from xtune.errors import ConfigError

    adapter = _adapter("llama")
    model = adapter.build_model(adapter.build_config(), "sdpa")
    model._no_split_modules = None
    model.model.layers = torch.nn.Identity()  # no layer list left in the decoder
    with pytest.raises(ConfigError, match="no decoder blocks found"):
        adapter.blocks(model)


def _folder(tmp_path, model_type, **extra):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
    return str(folder)


def test_family_detected_from_config_json(tmp_path):
    assert detect_family(ModelSpec(load_from=_folder(tmp_path, "llama"))) == "auto"
    assert detect_family(ModelSpec(load_from=_folder(tmp_path, "qwen3"))) == "qwen3"
    assert detect_family(ModelSpec(load_from=_folder(tmp_path, "qwen3_moe"))) == "qwen3_moe"
    assert detect_family(ModelSpec(load_from=_folder(tmp_path, "interns1"))) == "intern_s1"
    assert detect_family(ModelSpec(arch={"model_type": "mistral"})) == "auto"
    assert detect_family(ModelSpec(family="auto", load_from=str(tmp_path / "qwen3"))) == "auto"  # explicit wins
    assert detect_family(ModelSpec(arch={"hidden_size": 8})) is None


def test_refusals_name_the_reason(tmp_path):
    gemma2 = family_problems(ModelSpec(family="auto", load_from=_folder(tmp_path, "gemma2")))
    assert len(gemma2) == 1 and "model_type gemma2" in gemma2[0] and "sdpa" in gemma2[0]
    other = family_problems(ModelSpec(family="auto", load_from=_folder(tmp_path, "gpt_neox")))
    assert "gpt_neox" in other[0] and "llama" in other[0]
    capped = family_problems(ModelSpec(family="auto", arch={"model_type": "gemma3_text", "final_logit_softcapping": 30.0}))
    assert capped and "final_logit_softcapping" in capped[0]
    wrong = family_problems(ModelSpec(family="qwen3", load_from=_folder(tmp_path, "mistral")))
    assert wrong and "model_type mistral" in wrong[0] and "model.family=auto" in wrong[0]
    assert family_problems(ModelSpec(family="auto", load_from=_folder(tmp_path, "phi3"))) == []
