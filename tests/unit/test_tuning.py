"""LoRA / DoRA / QLoRA in one process on a tiny Qwen3 loaded from a Hugging Face folder.

References are independent of xtune's engine: the same folder loaded by transformers and wrapped by peft's own
`get_peft_model` (which initialises DoRA's magnitude itself), run document by document without packing.
"""

from __future__ import annotations

import dataclasses as dc
import sys

import pytest
import torch

from tests.distributed.tiny import ListLoader, pack, reference_loss, save_tiny_hf
from xtune.errors import ConfigError

BASE = ["recipe=demo", "model=qwen3_8b", "model.tokenizer=builtin:qwen3_tiny", "train.max_steps=4",
        "train.global_batch_size=1", "loss.mode=chunk", "sched=constant", "sched.warmup_ratio=0.0",
        "logging.tensorboard=false", "train.sample_prompts=[]", "data.eval_datasets=[]", "train.eval_every=0",
        "optim.max_grad_norm=0", "peft.r=4", "peft.alpha=8", "peft.modules_to_save=[]"]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "init"
    save_tiny_hf(folder, seed=11)
    return folder


def spec_of(init_dir, *extra):
    from xtune.config.compose import load_spec

    return load_spec(BASE + [f"model.load_from={init_dir}"] + list(extra))[1]


def trainer_of(spec, run_dir):
    from xtune.config.schema import ParallelSpec
    from xtune.engine.trainer import Trainer
    from xtune.methods import get_method
    from xtune.models import get_adapter
    from xtune.parallel.distributed import init_distributed

    adapter = get_adapter(spec.model)
    denv = init_distributed(ParallelSpec())
    return Trainer(spec, run_dir, method=get_method(spec), adapter=adapter, tokenizer=adapter.load_tokenizer(), denv=denv,
                   loader=ListLoader(4, 1, 0, 1, 1, seed=3, cycle=1))


@pytest.fixture
def closing():
    made = []
    yield made
    for tr in made:
        tr.close()


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def peft_reference(init_dir, trainer, use_dora=False):
    """The same folder through transformers + peft's get_peft_model, with the trainer's adapter weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(init_dir), attn_implementation="eager").float()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora))
    inner = ref.get_base_model()
    ours = adapter_params(trainer.model)
    theirs = {n: p for n, p in inner.named_parameters() if "lora_" in n}
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7 * (3 if use_dora else 2)
    return ref, inner, ours, theirs


def randomize_b(model, seed):
    """Non-zero B (seeded), so that A gets a gradient and the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter_params(model).items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return g


def assert_packed_equals_reference(tr, ref, ours, theirs, docs):
    """Copy our adapter weights into peft's model, then: one packed row through the engine == the documents one
    by one through peft's model (loss and adapter gradients)."""
    with torch.no_grad():
        for n, p in theirs.items():
            p.copy_(ours[n])
    stats = tr.forward_backward([pack(docs)])
    want = reference_loss(ref, docs)
    want.backward()
    assert abs(stats["loss"] - want.item()) < 1e-5
    for n, p in ours.items():
        torch.testing.assert_close(p.grad, theirs[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_lora_trains_only_adapters_and_the_base_stays_bit_identical(init_dir, tmp_path, closing):
    tr = trainer_of(spec_of(init_dir, "peft=lora", "optim.lr=1e-2"), tmp_path / "run")
    closing.append(tr)
    base = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in adapter_params(tr.model).items()}
    assert base and lora and all(p.requires_grad for p in adapter_params(tr.model).values())
    # Starts at the base model: B = 0, A non-zero.
    assert all(torch.count_nonzero(v) == 0 for n, v in lora.items() if "lora_B" in n)
    assert all(torch.count_nonzero(v) > 0 for n, v in lora.items() if "lora_A" in n)
    batch = next(tr.loader)
    losses = [tr.train_step(batch)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.05, losses
    after = dict(tr.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items()), "a frozen base weight changed"
    assert all(not torch.equal(after[n], v) for n, v in lora.items()), "an adapter weight did not train"
    # Optimizer state exists for the adapters alone.
    with_state = {id(p) for p in tr.optimizer.state}
    assert with_state == {id(p) for p in adapter_params(tr.model).values()}


def test_lora_packed_equals_peft_reference_unpacked(init_dir, tmp_path, closing):
    """Loss and adapter gradients of one packed row == peft's model on the documents one by one."""
    tr = trainer_of(spec_of(init_dir, "peft=lora"), tmp_path / "run")
    closing.append(tr)
    randomize_b(tr.model, 0)
    ref, inner, ours, theirs = peft_reference(init_dir, tr)
    docs = [d for row in ListLoader(1, 1, 0, 1, 1, seed=9, docs_per_row=4).rows_of_step(0) for d in row]
    assert_packed_equals_reference(tr, ref, ours, theirs, docs)
    assert all(p.grad is None for p in tr.model.parameters() if not p.requires_grad)


def test_dora_magnitude_and_forward_equal_peft_dora(init_dir, tmp_path, closing):
    tr = trainer_of(spec_of(init_dir, "peft=dora"), tmp_path / "run")
    closing.append(tr)
    ref, inner, ours, theirs = peft_reference(init_dir, tr, use_dora=True)
    mags = [n for n in ours if "lora_magnitude_vector" in n]
    assert len(mags) == 2 * 7
    for n in mags:  # peft computed its magnitudes from the loaded base weights itself
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-6, rtol=1e-6, msg=n)
    g = randomize_b(tr.model, 1)
    with torch.no_grad():
        for n, p in theirs.items():
            p.copy_(ours[n])
    ids = torch.randint(0, 96, (1, 20), generator=g)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = tr.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), ref.disable_adapter():  # the adapters change the output (the check can fail)
        assert (ref(input_ids=ids).logits - want).abs().max() > 1e-3


def test_qlora_base_is_4bit_trains_and_exports(init_dir, tmp_path, closing):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from xtune.peft.quant import is_nf4, nf4_bytes

    tr = trainer_of(spec_of(init_dir, "peft=qlora", "peft.r=4", "peft.alpha=8", "peft.dropout=0.0", "optim.lr=1e-2"),
                    tmp_path / "run")
    closing.append(tr)
    bases = {n: p for n, p in tr.model.named_parameters() if n.endswith("base_layer.weight")}
    assert len(bases) == 2 * 7
    for n, p in bases.items():
        assert is_nf4(p) and not p.requires_grad, n
        assert p.quantized_data.dtype == torch.uint8 and p.quantized_data.numel() * 2 == p.numel(), n
        # 4 bits per value plus the double-quantised block scales: about 0.53 bytes per parameter
        assert nf4_bytes(p) <= 0.56 * p.numel() + 256, (n, nf4_bytes(p), p.numel())
    codes = {n: p.quantized_data.clone() for n, p in bases.items()}
    batch = next(tr.loader)
    losses = [tr.train_step(batch)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p.quantized_data, codes[n]) for n, p in bases.items())

    out = tr.export_hf()
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = tr.model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids).logits
    # The merge adds the adapters to the dequantised 4-bit base: the trained model's logits exactly.
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(init_dir)),
                                           str(tmp_path / "run" / "hf_adapter")).eval()
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    ours = adapter_params(tr.model)
    assert len(loaded) == len(ours) == 2 * 7 * 2
    for n, p in loaded.items():
        torch.testing.assert_close(p, ours[n.removeprefix("base_model.model.")])
    with torch.no_grad():  # over the full-precision base: close to the 4-bit model, not equal
        assert (peft_model(input_ids=ids).logits - trained).abs().max() < 0.5


# ----------------------------------------------------------------------------------------- bad input


def test_target_matching_nothing_is_refused_before_any_weight(init_dir, tmp_path):
    from xtune.engine.preflight import preflight
    from xtune.models import get_adapter

    spec = spec_of(init_dir, "peft=lora", "peft.target_modules=[qkv_proj,q_proj]")
    with pytest.raises(ConfigError) as e:
        preflight(spec, get_adapter(spec.model), tmp_path)
    msg = str(e.value)
    assert "peft.target_modules: 'qkv_proj' matches no linear layer" in msg
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in msg
    assert "'q_proj'" not in msg
    spec = spec_of(init_dir, "peft=lora", "peft.modules_to_save=[embed_tokenz]")
    with pytest.raises(ConfigError, match="peft.modules_to_save: no module named 'embed_tokenz'"):
        preflight(spec, get_adapter(spec.model), tmp_path)


@pytest.mark.parametrize("extra,expect", [
    (["peft=lora", "peft.r=0"], "peft.r=0: the adapter rank must be > 0"),
    (["peft=lora", "model.freeze_language=true"], "model.freeze_language=true contradicts adapters"),
    (["peft=dora", "peft.quantize=nf4"], "peft.method=dora with peft.quantize=nf4 is not supported"),
    (["peft=none", "peft.quantize=nf4"], "peft.quantize=nf4 needs adapters"),
])
def test_peft_config_problems_are_reported_at_compose_time(init_dir, extra, expect):
    with pytest.raises(ConfigError) as e:
        spec_of(init_dir, *extra)
    assert any(expect in p for p in e.value.problems), e.value.problems


def test_qlora_without_the_4bit_library_names_the_extra(init_dir, monkeypatch):
    from xtune.config.validate import validate

    spec = spec_of(init_dir, "peft=qlora")
    assert not any("xtune[qlora]" in p for p in validate(spec))
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao looks like
    assert any("pip install 'xtune[qlora]'" in p for p in validate(spec))


def test_regex_targets_reach_outside_the_language_model_only_when_asked(init_dir):
    from xtune.models import get_adapter
    from xtune.peft.lora import resolve_targets

    spec = spec_of(init_dir, "peft=lora")
    adapter = get_adapter(spec.model)
    with torch.device("meta"):
        model = adapter.build_model(adapter.build_config(), "sdpa")
    names, problems = resolve_targets(model, adapter, dc.replace(spec.peft, target_modules=["all-linear"]))
    assert not problems and len(names) == 14 and "lm_head" not in names
    names, _ = resolve_targets(model, adapter, dc.replace(spec.peft, target_modules=[r"model\.layers\.1\..*_proj"]))
    assert names == [n for n in names if n.startswith("model.layers.1.")] and len(names) == 7


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_lora_on_the_auto_family_equals_peft_all_linear(model_type, tmp_path, closing):
    """`all-linear` on an `auto` model (tied Llama; Phi-3 with fused qkv / gate_up projections) adapts the same
    layers as peft's own all-linear, and the packed loss and adapter gradients equal peft's model unpacked."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.integration.test_model_auto import make_auto_original
    from xtune.config.compose import load_spec

    folder = tmp_path / "orig"
    make_auto_original(model_type, folder)
    spec = load_spec(BASE + ["model=auto", f"model.load_from={folder}", "model.tokenizer=null", "peft=lora"])[1]
    assert spec.model.family == "auto"
    tr = trainer_of(spec, tmp_path / "run")
    closing.append(tr)
    randomize_b(tr.model, 0)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").float(),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours, theirs = adapter_params(tr.model), {n: p for n, p in ref.get_base_model().named_parameters() if "lora_" in n}
    assert sorted(ours) == sorted(theirs) and ours
    docs = [d for row in ListLoader(1, 1, 0, 1, 1, seed=4, docs_per_row=3).rows_of_step(0) for d in row]
    assert_packed_equals_reference(tr, ref, ours, theirs, docs)


def test_adapter_only_export_is_what_samples_load(init_dir, tmp_path, closing):
    """peft.merge_on_export=false: only hf_adapter/ is written, and the samples path (engine/samples.py) loads it
    over its base through peft, with the trained model's logits."""
    from xtune.generate.load import load_export

    tr = trainer_of(spec_of(init_dir, "peft=lora", "peft.merge_on_export=false"), tmp_path / "run")
    closing.append(tr)
    randomize_b(tr.model, 3)
    out = tr.export_hf()
    assert out == tmp_path / "run" / "hf_adapter" and not (tmp_path / "run" / "hf").exists()
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(load_export(tr.adapter, out)(input_ids=ids).logits, tr.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_adapter_of_multimodal_gemma3_loads_onto_the_multimodal_model(tmp_path, closing):
    """LoRA on the language model of a multimodal Gemma 3 folder: hf_adapter/ names the multimodal model's
    modules, so peft applies it to Gemma3ForConditionalGeneration (text logits = the trained model's), and the
    samples path still applies it to the text model it builds."""
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    from tests.integration.test_model_auto import make_auto_original
    from xtune.config.compose import load_spec
    from xtune.generate.load import load_export

    folder = tmp_path / "orig"
    make_auto_original("gemma3", folder)
    spec = load_spec(BASE + ["model=auto", f"model.load_from={folder}", "model.tokenizer=null", "peft=lora",
                             "peft.merge_on_export=false"])[1]
    tr = trainer_of(spec, tmp_path / "run")
    closing.append(tr)
    randomize_b(tr.model, 2)
    out = tr.export_hf()
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(5))
    whole = PeftModel.from_pretrained(Gemma3ForConditionalGeneration.from_pretrained(str(folder)), str(out)).eval()
    with torch.no_grad():
        want = tr.model(input_ids=ids).logits
        base = Gemma3ForConditionalGeneration.from_pretrained(str(folder)).eval()(input_ids=ids).logits
        torch.testing.assert_close(whole(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_export(tr.adapter, out)(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert (base - want).abs().max().item() > 1e-3  # the adapters change the output


@pytest.mark.parametrize("family", ["intern_s1", "qwen3"])
def test_adapters_on_a_vlm_warn_that_the_vision_tower_stays_frozen(family, caplog):
    import logging

    from xtune import peft as xpeft
    from xtune.config.schema import ModelSpec, PeftSpec
    from xtune.models import get_adapter
    from xtune.models.tiny import INTERN_S1_TINY, QWEN3_TINY

    arch = dict(INTERN_S1_TINY, image_token_id=5) if family == "intern_s1" else QWEN3_TINY
    adapter = get_adapter(ModelSpec(family=family, arch=arch))
    with torch.device("meta"):
        model = adapter.build_model(adapter.build_config(), "sdpa")
    with caplog.at_level(logging.WARNING, logger="xtune.peft"):
        xpeft.inject(model, adapter, PeftSpec(method="lora", r=4, alpha=8.0))
    assert ("vision tower and projector stay frozen" in caplog.text) == (family == "intern_s1")


def test_qlora_resume_reloads_the_same_4bit_base_and_continues_exactly(init_dir, tmp_path, closing):
    """A QLoRA checkpoint holds only the adapters and their state; the resumed run quantizes the base again from
    load_from as it loads (tuning/quant.py::take_off_bases) and must continue with the same losses, bit for bit."""
    spec = spec_of(init_dir, "peft=qlora", "peft.dropout=0.0", "optim.lr=1e-2")
    a = trainer_of(spec, tmp_path / "a")
    closing.append(a)
    a.loader = ListLoader(4, 1, 0, 1, 1, seed=3)  # a new row every step: the loader's position must resume too
    codes = {n: p.quantized_data.clone() for n, p in a.model.named_parameters() if n.endswith("base_layer.weight")}

    def steps(tr, n):
        return [tr.train_step(next(tr.loader))["loss"] for _ in range(n)]

    steps(a, 2)
    ckpt = a.save()
    after = steps(a, 2)

    b = trainer_of(spec, tmp_path / "b")
    closing.append(b)
    b.loader = ListLoader(4, 1, 0, 1, 1, seed=3)
    b.resume(ckpt)
    bases = {n: p for n, p in b.model.named_parameters() if n.endswith("base_layer.weight")}
    assert bases.keys() == codes.keys() and all(torch.equal(p.quantized_data, codes[n]) for n, p in bases.items())
    assert b.step == 2 and steps(b, 2) == after
