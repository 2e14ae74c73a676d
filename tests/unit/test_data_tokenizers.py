"""The tokenizers shipped with xtune load offline and follow Qwen3 / Intern-S1 conventions."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

ASSETS = Path(__file__).resolve().parents[2] / "src" / "xtune" / "assets" / "tokenizers"

QWEN3_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]


@pytest.mark.parametrize("name", ["qwen3_tiny", "intern_s1_tiny"])
def test_builtin_tokenizer_layout(name):
    folder = ASSETS / name
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.convert_tokens_to_ids(QWEN3_ADDED)
    first = ids[0]
    assert ids == list(range(first, first + 26)), "Qwen3's added tokens must be contiguous, in Qwen3's order"
    assert 2000 <= first <= 4096  # the BPE vocabulary comes first
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "Hello, world! 123 def f(x): return x**2  两张图片有啥相同之处？ <think>"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == text
    assert enc[-1] == tok.convert_tokens_to_ids("<think>")  # added tokens are matched whole
    # Qwen's pre-tokenizer splits digits one by one.
    digits = tok("12345", add_special_tokens=False)["input_ids"]
    assert len(digits) == 5


def test_qwen3_template_think_block_only_on_last_turn():
    tok = AutoTokenizer.from_pretrained(ASSETS / "qwen3_tiny")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Sure"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nSure<|im_end|>\n"
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = tok.apply_chat_template(msgs[1:2], tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools") and text.endswith("<|im_start|>assistant\n")


def test_intern_s1_tokenizer_has_image_tokens():
    tok = AutoTokenizer.from_pretrained(ASSETS / "intern_s1_tiny")
    ids = tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
    assert len(set(ids)) == 3 and all(i > tok.convert_tokens_to_ids("</think>") for i in ids)
    enc = tok("<img><IMG_CONTEXT><IMG_CONTEXT></img>", add_special_tokens=False)["input_ids"]
    assert enc == [ids[0], ids[2], ids[2], ids[1]]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
