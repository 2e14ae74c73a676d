"""Tokenisation equals apply_chat_template; labels cover exactly the assistant turns (+ end of turn)."""

import json

import numpy as np
import pytest

from xtune.data.records import parse_record
from xtune.data.templates import resolve_template
from xtune.data.tokenize import SampleTokenizer, TokenizedChunk, TokenizeSettings
from xtune.data.tokenize_files import tokenize_files
from xtune.errors import DataError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},  # noqa: E501
     {"role": "tool", "content": "{\"temp\": 21}"},
     {"role": "assistant", "content": "It is 21 degrees."}],
    [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because.", "reasoning_content": "Think hard."}],
    [{"role": "user", "content": "Say hi twice"}, {"role": "assistant", "content": "hi"},
     {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi hi"}],
]


def tokenize(tok, msgs, max_len=4096, meta=None, **settings):
    st = SampleTokenizer(tok, TokenizeSettings(resolve_template(tok), max_len, **settings))
    out = TokenizedChunk()
    rec = parse_record("t.jsonl", 1, json.dumps({"messages": msgs, **(meta or {})}), ".")
    st.tokenize([rec], out)
    return out


def trained_text(tok, ids, labels):
    """Decode the targets: runs of trained tokens joined by '|'."""
    ids, labels = list(ids), list(labels)
    assert labels[-1] == -100
    runs, cur = [], []
    for i in range(len(ids) - 1):
        if labels[i] != -100:
            assert labels[i] == ids[i + 1]  # shifted inside the document
            cur.append(ids[i + 1])
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return "|".join(runs)


@pytest.mark.parametrize("k", range(len(CONVS)))
@pytest.mark.parametrize("tok_name", ["qwen_tok", "intern_tok"])
def test_ids_equal_apply_chat_template(k, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    meta = {"tools": TOOLS} if k == 2 else {}
    out = tokenize(tok, CONVS[k], meta=meta)
    ref = tok.apply_chat_template(CONVS[k], tools=meta.get("tools"), tokenize=True, return_dict=False)
    assert out.ids[0].tolist() == list(ref)


def test_ids_equal_apply_chat_template_on_resource_files(qwen_tok, resource_dir):
    for name in ("mllm_sft_text_example_data.jsonl", "openai_sft.jsonl"):
        lines = [line for line in (resource_dir / name).read_text().splitlines() if line.strip()]
        settings = TokenizeSettings(resolve_template(qwen_tok), 10**6)
        out = tokenize_files(qwen_tok, settings, [str(resource_dir / name)], None)
        # every record became one sample (none skipped or dropped), in line order
        assert out.records == len(lines) == len(out.ids) > 100 and not out.errors and not out.dropped_no_loss
        assert [s.rsplit(":", 1)[1] for s in out.sources] == [str(i) for i in range(1, len(lines) + 1)]
        for line, ids in zip(lines[:40], out.ids):
            obj = json.loads(line)
            msgs = obj["messages"] if isinstance(obj, dict) else obj
            assert ids.tolist() == list(qwen_tok.apply_chat_template(msgs, tokenize=True, return_dict=False))


def test_qwen3_labels_follow_the_rendered_turns(qwen_tok):
    out = tokenize(qwen_tok, CONVS[1])
    # earlier assistant turn: no think block; the last one: the empty think block is trained too
    assert trained_text(qwen_tok, out.ids[0], out.labels[0]) == "4<|im_end|>|<think>\n\n</think>\n\n6<|im_end|>"
    out = tokenize(qwen_tok, CONVS[3])
    assert trained_text(qwen_tok, out.ids[0], out.labels[0]) == "<think>\nThink hard.\n</think>\n\nBecause.<|im_end|>"
    out = tokenize(qwen_tok, CONVS[2], meta={"tools": TOOLS})
    assert trained_text(qwen_tok, out.ids[0], out.labels[0]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "|<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>"
    )
    # a user message equal to an assistant's content does not confuse the spans
    out = tokenize(qwen_tok, CONVS[4])
    assert trained_text(qwen_tok, out.ids[0], out.labels[0]) == "hi<|im_end|>|<think>\n\n</think>\n\nhi hi<|im_end|>"


def test_intern_s1_labels(intern_tok):
    out = tokenize(intern_tok, CONVS[1])
    assert trained_text(intern_tok, out.ids[0], out.labels[0]) == "4<|im_end|>|6<|im_end|>"


def test_per_message_loss_override(qwen_tok):
    msgs = [{"role": "user", "content": "Question", "loss": True}, {"role": "assistant", "content": "A1", "loss": False},
            {"role": "user", "content": "Next"}, {"role": "assistant", "content": "A2"}]
    out = tokenize(qwen_tok, msgs)
    assert trained_text(qwen_tok, out.ids[0], out.labels[0]) == "Question<|im_end|>|<think>\n\n</think>\n\nA2<|im_end|>"


def test_pretrain_trains_everything_plus_eos(qwen_tok):
    out = tokenize(qwen_tok, [{"role": "pretrain", "content": "Plain text to learn."}])
    ids = out.ids[0].tolist()
    assert ids == qwen_tok("Plain text to learn.", add_special_tokens=False)["input_ids"] + [qwen_tok.eos_token_id]
    assert out.labels[0].tolist() == ids[1:] + [-100]


def test_truncation_and_drops(qwen_tok, caplog):
    long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]
    out = tokenize(qwen_tok, long, max_len=64)
    assert out.truncated == 1 and len(out.ids[0]) == 64 and out.labels[0][-1] == -100
    # all trained tokens cut away -> dropped
    late = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    out = tokenize(qwen_tok, late, max_len=64)
    assert out.dropped_no_loss == 1 and not out.ids
    out = tokenize(qwen_tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "loss": False}])
    assert out.dropped_no_loss == 1


def image_msgs(n_images, path, wh=(900, 300)):
    parts = [{"type": "image_url", "image_url": {"url": str(path), "image_wh": list(wh)}} for _ in range(n_images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": "A picture."}]


def test_image_tokens_expanded_and_not_trained(intern_tok, make_image):
    path = make_image("wide.png", 900, 300)
    msgs = image_msgs(2, path)
    out = tokenize(intern_tok, msgs, image_size=64, tokens_per_tile=4, max_tiles=6, use_thumbnail=True)
    ids = out.ids[0]
    start, ctx, end = intern_tok.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    # 900x300 -> 3x1 grid (+ thumbnail) = 4 tiles x 4 tokens per image
    assert [im.num_tiles for im in out.images[0]] == [4, 4]
    assert (ids == ctx).sum() == 2 * 16 and (ids == start).sum() == 2 and (ids == end).sum() == 2
    for im in out.images[0]:
        block = ids[im.token_start:im.token_start + im.num_tokens].tolist()
        assert block == [start] + [ctx] * 16 + [end]
    # the ids equal the template's, with each placeholder expanded
    ref = intern_tok.apply_chat_template(
        [{"role": "user", "content": "<IMG_CONTEXT>\n<IMG_CONTEXT>\nDescribe."}, msgs[1]], tokenize=True, return_dict=False)
    expanded = []
    for t in ref:
        expanded += [start] + [ctx] * 16 + [end] if t == ctx else [t]
    assert ids.tolist() == expanded
    assert trained_text(intern_tok, ids, out.labels[0]) == "A picture.<|im_end|>"


def test_image_cut_by_truncation_is_dropped(intern_tok, make_image):
    path = make_image("a.png", 64, 64)
    out = tokenize(intern_tok, image_msgs(1, path, (64, 64)), max_len=60, image_size=64, tokens_per_tile=64)
    assert out.dropped_image_cut == 1 and not out.ids


def test_image_size_read_from_header_when_absent(intern_tok, make_image):
    path = make_image("tall.png", 100, 400)
    msgs = [{"role": "user", "content": [{"type": "image", "image": {"url": str(path)}}]},
            {"role": "assistant", "content": "Tall."}]
    out = tokenize(intern_tok, msgs, image_size=100, tokens_per_tile=2, max_tiles=4)
    im = out.images[0][0]
    assert (im.width, im.height, im.num_tiles) == (100, 400, 5)  # 1x4 grid + thumbnail


def test_images_need_image_tokens(qwen_tok, make_image):
    path = make_image("a.png", 8, 8)
    with pytest.raises(DataError, match="t.jsonl:1: .*no <img>"):
        tokenize(qwen_tok, image_msgs(1, path, (8, 8)))


def test_resource_multimodal_files(intern_tok, resource_dir):
    settings = TokenizeSettings(resolve_template(intern_tok), 10**6, image_size=448, tokens_per_tile=256, max_tiles=12)
    for name, per_sample in (("mllm_sft_single_image_example_data.jsonl", 1), ("mllm_sft_multi_image_example_data.jsonl", 2)):
        out = tokenize_files(intern_tok, settings, [str(resource_dir / name)], str(resource_dir.parent))
        assert out.records == len(out.ids) > 0
        ctx = intern_tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        for ids, ims in zip(out.ids, out.images):
            assert len(ims) == per_sample
            assert int((ids == ctx).sum()) == sum(im.num_tiles * 256 for im in ims)
        dog = next(im for im in out.images[0] if "dog" in im.path)
        assert (dog.width, dog.height) == (375, 500)


def test_worker_processes_give_the_same_result(qwen_tok, resource_dir):
    settings = TokenizeSettings(resolve_template(qwen_tok), 512)
    files = [str(resource_dir / "openai_sft.jsonl")]
    a = tokenize_files(qwen_tok, settings, files, None, num_workers=0)
    b = tokenize_files(qwen_tok, settings, files, None, num_workers=2, chunk_lines=40)
    assert len(a.ids) == len(b.ids) == a.records
    assert all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids))
    assert all(np.array_equal(x, y) for x, y in zip(a.labels, b.labels))
    assert a.sources == b.sources
