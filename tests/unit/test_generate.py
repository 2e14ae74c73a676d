"""The generation engine against transformers itself, on tiny random folders written by transformers / peft.

- Greedy completions equal transformers' own greedy `generate` (one prompt at a time, no padding, the prompt
  rendered by the tokenizer's `apply_chat_template`) token for token, for a dense Qwen3, a Qwen3-MoE, an `auto`
  family Llama and a LoRA adapter folder (reference: peft's unmerged PeftModel over the base).
- Sampling with a seed repeats; another seed differs; `n` completions per prompt.
- Stop strings cut the text before the string; log-likelihoods equal a plain forward's log-softmax sums.
- The chat template as training renders it; `enable_thinking` passed through.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_model_auto import make_auto_original
from tests.integration.test_model_families import make_original
from xtune.config.schema import GenSpec
from xtune.errors import XtuneError
from xtune.generate import Generator

PROMPTS = ["What is 2 + 3?", "Sort from smallest to largest: 7 2 9 4", "Name a colour.",
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]]
NEW = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gen")
    make_original("qwen3_tiny", root / "dense")
    make_original("qwen3_moe_tiny", root / "moe")
    make_auto_original("llama", root / "llama")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(str(root / "dense"))
    # init_lora_weights=False: B is random too, so the adapter changes the answers.
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(str(root / "lora"))
    cfg_path = root / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(root / "dense")
    cfg_path.write_text(json.dumps(cfg))
    return root


def _reference(folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))
        return model.eval(), AutoTokenizer.from_pretrained(base)
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def _messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _reference_greedy(model, tok, prompt, new=NEW):
    ids = tok.apply_chat_template(_messages(prompt), add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["dense", "moe", "llama", "lora"])
def test_greedy_equals_transformers_generate(folders, name):
    gen = Generator.from_path(folders / name)
    got = gen.generate(PROMPTS, GenSpec(max_new_tokens=NEW, batch_size=3))  # a padded batch of 3, then 1
    model, tok = _reference(folders / name)
    for prompt, (completion,) in zip(PROMPTS, got):
        prompt_ids, want = _reference_greedy(model, tok, prompt)
        assert gen.render(prompt) == prompt_ids
        assert completion.token_ids == want, prompt
        assert completion.text == tok.decode(want, skip_special_tokens=True)
        assert completion.finish_reason == ("stop" if len(want) < NEW else "length")
    if name == "lora":  # the adapter is applied: the base answers otherwise
        base = Generator.from_path(folders / "dense").generate(PROMPTS, GenSpec(max_new_tokens=NEW))
        assert [c[0].token_ids for c in base] != [c[0].token_ids for c in got]


def test_sampling_is_seeded_and_gives_n_completions(folders):
    gen = Generator.from_path(folders / "dense")
    spec = GenSpec(max_new_tokens=8, temperature=1.5, top_p=0.95, top_k=50, n=3, seed=7, batch_size=2)
    first = gen.generate(PROMPTS[:3], spec)
    assert [len(c) for c in first] == [3, 3, 3]
    assert gen.generate(PROMPTS[:3], spec) == first
    assert any(len({tuple(c.token_ids) for c in cs}) > 1 for cs in first)  # n samples, not n copies
    other = gen.generate(PROMPTS[:3], GenSpec(**{**spec.__dict__, "seed": 8}))
    assert other != first
    # the caller's random stream is left alone
    torch.manual_seed(0)
    gen.generate(PROMPTS[:1], spec)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_stop_strings_cut_the_text(folders):
    gen = Generator.from_path(folders / "dense")
    greedy = gen.generate(PROMPTS[:2], GenSpec(max_new_tokens=16))
    for prompt, (full,) in zip(PROMPTS[:2], greedy):
        text = full.text
        stop = text[len(text) // 2: len(text) // 2 + 2]  # a piece from the middle of the greedy answer
        (cut,) = gen.generate([prompt], GenSpec(max_new_tokens=16, stop=[stop]))[0]
        assert cut.text == text[:text.index(stop)]
        assert cut.finish_reason == "stop"
        assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
        assert stop in gen.tokenizer.decode(cut.token_ids)


def test_loglikelihood_equals_a_plain_forward(folders):
    gen = Generator.from_path(folders / "dense")
    pairs = [("What is 2 + 3?", "5"), ("Name a colour.", "The sky is blue."), (PROMPTS[3], "Hello there")]
    got = gen.loglikelihood(pairs, batch_size=2)
    model, tok = _reference(folders / "dense")
    for (prompt, cont), value in zip(pairs, got):
        ctx = tok.apply_chat_template(_messages(prompt), add_generation_prompt=True, return_dict=True)["input_ids"]
        cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        want = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont_ids))
        assert value == pytest.approx(want, abs=1e-4)


def test_render_follows_the_template_and_enable_thinking(folders):
    gen = Generator.from_path(folders / "dense")
    tok = gen.tokenizer
    msgs = _messages("hi")
    plain = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.decode(gen.render("hi")) == plain and plain.endswith("<|im_start|>assistant\n")
    off = tok.decode(gen.render("hi", GenSpec(enable_thinking=False)))
    assert off == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert off.endswith("<think>\n\n</think>\n\n")


def test_bad_paths_name_the_path_and_what_was_expected(folders, tmp_path):
    with pytest.raises(XtuneError, match="no such file or folder; expected a run directory"):
        Generator.from_path(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("recipe: demo\n")
    with pytest.raises(XtuneError, match=r"run directory with no checkpoint yet"):
        Generator.from_path(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(XtuneError, match=r"run directory with no checkpoint yet \(checkpoints/ holds no complete"):
        Generator.from_path(tmp_path / "run")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = json.loads((folders / "lora" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(XtuneError, match="base model /nowhere/base .* is not here; expected a Hugging Face model"):
        Generator.from_path(adapter)
    (tmp_path / "empty").mkdir()
    with pytest.raises(XtuneError, match="is not a model xtune can load"):
        Generator.from_path(tmp_path / "empty")


def test_live_model_generates_with_standard_attention_and_is_restored(folders):
    """A training module on a custom xtune attention (here one that refuses to run) generates with sdpa and the
    KV cache, and is handed back as it was: its attention, train mode and config untouched."""
    from transformers import AttentionInterface

    def refuse(*args, **kwargs):
        raise RuntimeError("a training kernel ran during generation")

    AttentionInterface.register("xtune_refuses", refuse)
    want = Generator.from_path(folders / "dense").generate(PROMPTS[:2], GenSpec(max_new_tokens=NEW))
    live = Generator.from_path(folders / "dense")
    model = live.model
    model.set_attn_implementation("xtune_refuses")
    model.config.use_cache = False
    model.train()
    with pytest.raises(RuntimeError, match="training kernel"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert Generator(model, live.tokenizer).generate(PROMPTS[:2], GenSpec(max_new_tokens=NEW)) == want
    assert model.training and model.config._attn_implementation == "xtune_refuses" and model.config.use_cache is False


def test_remote_code_runs_only_when_allowed(tmp_path):
    """A folder whose tokenizer is Python code shipped in it (Intern-S1's kind; the tests' fixture) is refused, naming
    the file and the flag; with trust_remote_code=True it loads and answers, its prompt rendered by that tokenizer."""
    from tests.s1_fixture import build_s1_tokenizer

    folder = tmp_path / "m"
    make_original("qwen3_tiny", folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    build_s1_tokenizer(folder)
    with pytest.raises(XtuneError, match=r"tokenization_s1_fixture.py .* pass --trust-remote-code"):
        Generator.from_path(folder)
    gen = Generator.from_path(folder, trust_remote_code=True)
    assert type(gen.tokenizer).__name__ != "Qwen2TokenizerFast"
    (c,) = gen.generate(["hi"], GenSpec(max_new_tokens=4))[0]
    assert len(c.token_ids) == 4 or c.finish_reason == "stop"
