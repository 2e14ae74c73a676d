"""GRPO prompt records: a `prompt` string or message list, or `messages` ending with a user turn; the other keys
kept as fields; rendered as the tokenizer's own apply_chat_template renders a generation prompt; bad records located
(file:line) or skipped; prompts over the length limit left out; the ids equal the generation engine's
rendering; the stream is a seeded permutation per pass, resumable."""

import dataclasses
import json

import pytest

from xtune.config.schema import DatasetSpec, DataSpec, GrpoSpec, ModelSpec, RunSpec
from xtune.data.prompts import PromptSet, PromptStream
from xtune.errors import DataError
from xtune.models import get_adapter


@pytest.fixture(scope="module")
def tokenizer():
    return get_adapter(ModelSpec(family="qwen3", tokenizer="builtin:qwen3_tiny")).load_tokenizer()


def _spec(path, **grpo):
    return dataclasses.replace(RunSpec(), method="grpo", grpo=GrpoSpec(**grpo), model=ModelSpec(family="qwen3"),
                               data=DataSpec(datasets=[DatasetSpec(name="p", path=str(path))]))


def _write(tmp_path, records):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f


def test_prompt_forms_fields_and_rendering(tmp_path, tokenizer):
    f = _write(tmp_path, [
        {"prompt": "What is 2 + 3?", "answer": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 7},
        {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                      {"role": "user", "content": "C"}], "answer": "D"},
    ])
    ps = PromptSet(_spec(f), tokenizer)
    assert len(ps) == 3
    first = ps[0]
    assert first.prompt == "What is 2 + 3?" and first.fields == {"answer": "5"} and first.source == f"{f}:1"
    assert ps[1].fields == {"id": 7} and ps[2].fields == {"answer": "D"}
    # independent: transformers' apply_chat_template with the generation prompt (gen.enable_thinking null: not passed)
    want = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                         tokenize=False)
    assert first.ids == tokenizer(want, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ps[2].ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("thinking", [None, False, True])
def test_the_ids_trained_on_are_the_ids_the_generation_engine_samples_from(tmp_path, tokenizer, thinking):
    from xtune.generate.prompts import PromptRenderer

    prompts = ["What is 2 + 3?", [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]]
    f = _write(tmp_path, [{"prompt": p} for p in prompts])
    spec = _spec(f)
    spec = dataclasses.replace(spec, gen=dataclasses.replace(spec.gen, enable_thinking=thinking))
    ps = PromptSet(spec, tokenizer)
    engine = PromptRenderer(tokenizer, spec.data.template, spec.model.family)
    assert [p.ids for p in ps.items] == [engine.render(p, thinking).ids for p in prompts]
    if thinking is False:
        assert tokenizer.decode(ps[0].ids).endswith("<think>\n\n</think>\n\n")


def test_prompts_over_the_length_limit_are_left_out(tmp_path, tokenizer):
    f = _write(tmp_path, [{"prompt": "word " * 200 + "the question?"}, {"prompt": "short"}])
    ps = PromptSet(_spec(f, max_prompt_length=32), tokenizer)
    assert [p.prompt for p in ps.items] == ["short"] and ps.too_long == 1
    with pytest.raises(DataError, match="no usable prompt"):
        PromptSet(_spec(f, max_prompt_length=4), tokenizer)


@pytest.mark.parametrize("record, fragment", [
    ({"text": "no prompt"}, "a prompt record is an object with a 'prompt' (text or messages) or 'messages' key"),
    ({"prompt": []}, "'prompt' must be a string or a non-empty list of messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "the last message must be a user turn (the prompt to answer), got 'assistant'"),
    ({"prompt": [{"role": "wizard", "content": "q"}]}, "unknown role 'wizard'"),
    ('{"prompt": "unterminated', "malformed JSON"),
])
def test_a_bad_record_is_located(tmp_path, tokenizer, record, fragment):
    f = _write(tmp_path, [{"prompt": "fine"}, record])
    with pytest.raises(DataError, match=f"{f}:2: ") as e:
        PromptSet(_spec(f), tokenizer)
    assert fragment in str(e.value)


def test_on_error_skip_counts_the_bad_records(tmp_path, tokenizer):
    f = _write(tmp_path, [{"prompt": "fine"}, {"text": "bad"}, {"prompt": "also fine"}])
    spec = _spec(f)
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, on_error="skip"))
    ps = PromptSet(spec, tokenizer)
    assert [p.prompt for p in ps.items] == ["fine", "also fine"] and len(ps.skipped) == 1


def test_the_stream_is_a_seeded_permutation_per_pass_and_resumes():
    s = PromptStream(5, seed=3)
    first = s.take(3) + s.take(4)  # crosses into the second pass
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and len(set(first[5:])) == 2
    again = PromptStream(5, seed=3)
    again.take(3)
    state = again.state_dict()
    resumed = PromptStream(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(4) == first[3:]
    assert PromptStream(5, seed=4).take(5) != first[:5]


def test_each_pass_has_its_own_order():
    s = PromptStream(20, seed=1)
    a, b = s.take(20), s.take(20)
    assert sorted(a) == sorted(b) == list(range(20)) and a != b
