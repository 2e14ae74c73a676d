"""A vision-language turn: the tiny Intern-S1 (InternVL layout, written by xtune from random init) answers a prompt
with an image. The prompt's tokens are the ones training renders for that turn (the data stage's own tokeniser:
image placeholder expanded to the image's tiles), the answer is transformers' own greedy `generate` on the folder
with the same pixels, and `xtune chat --image` prints it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from xtune.config.schema import GenSpec, ModelSpec
from xtune.generate import Generator

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from xtune.config.compose import load_spec
    from xtune.models import get_adapter

    root = tmp_path_factory.mktemp("vlm")
    _, spec = load_spec(["recipe=demo", "model=intern_s1_tiny", "data=demo_vl", "train.max_steps=1"])
    adapter = get_adapter(spec.model)
    config = adapter.build_config()
    torch.manual_seed(3)
    with torch.device("meta"):
        model = adapter.build_model(config, "sdpa")
    model.to_empty(device="cpu")
    adapter.init_weights(model)
    adapter.save_hf(model.state_dict(), config, adapter.load_tokenizer(), root / "hf")
    return root / "hf", spec


def _turn(image):
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": QUESTION}]}]


def test_image_turn_is_rendered_as_training_and_generates_like_transformers(vlm, make_image):
    from transformers import AutoModelForImageTextToText

    from xtune.data.dataset import tokenize_settings
    from xtune.data.multimodal import load_tiles
    from xtune.data.records import parse_record
    from xtune.data.tokenize import SampleTokenizer, TokenizedChunk

    folder, spec = vlm
    image = make_image("wide.png", 150, 60)  # several tiles and a thumbnail at 56 px
    gen = Generator.from_path(folder)
    ids = gen.render(_turn(image))
    # The data stage on the same turn answered: the prompt is what precedes the answer in training.
    # (a bare folder does not say how many tiles training allowed: the engine takes model.max_tiles' default)
    model_spec = dataclasses.replace(spec.model, max_tiles=ModelSpec().max_tiles)
    tok = SampleTokenizer(gen.tokenizer, tokenize_settings(gen.tokenizer, spec.data, model_spec))
    line = ('{"messages": [{"role": "user", "content": [{"type": "image", "image": "' + str(image) + '"}, '
            '{"type": "text", "text": "' + str(QUESTION) + '"}]}, {"role": "assistant", "content": "A picture."}]}')
    chunk = TokenizedChunk()
    tok.tokenize([parse_record("t.jsonl", 1, line, "/")], chunk)
    assert chunk.ids[0][:len(ids)].tolist() == ids and len(chunk.ids[0]) > len(ids)
    pixels = load_tiles(str(image), spec.model.image_size, model_spec.max_tiles, True)
    tiles = ids.count(gen.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) // spec.model.tokens_per_tile
    assert tiles == len(pixels) > 1

    (got,) = gen.generate([_turn(image)], GenSpec(max_new_tokens=10))[0:1]
    ref = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pixels, do_sample=False,
                           max_new_tokens=10, eos_token_id=gen.tokenizer.eos_token_id,
                           pad_token_id=gen.tokenizer.pad_token_id)
    assert got[0].token_ids == out[0, x.shape[1]:].tolist()
    # the image is seen: another picture, another answer
    other = make_image("tall.png", 40, 200)
    assert gen.generate([_turn(other)], GenSpec(max_new_tokens=10))[0][0].token_ids != got[0].token_ids


def test_chat_with_image(vlm, make_image):
    from tests.distributed.tiny import child_env
    from tests.integration.test_model_families import ROOT

    folder, _ = vlm
    image = make_image("wide.png", 150, 60)
    want = Generator.from_path(folder).generate([_turn(image)], GenSpec(max_new_tokens=8))[0][0].text
    proc = subprocess.run([sys.executable, "-m", "xtune", "chat", str(folder), "--image", str(image), "--prompt",
                           QUESTION, "gen.max_new_tokens=8"], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == want + "\n"
