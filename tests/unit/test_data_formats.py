"""Reading JSONL records: accepted shapes, and every kind of bad input named by file:line."""

import json

import pytest

from xtune.data.dataset import load_dataset
from xtune.data.records import IMG_PLACEHOLDER, iter_lines, list_files, parse_record
from xtune.errors import DataError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_dict_and_bare_list_records(tmp_path):
    rec = parse_record("f.jsonl", 3, json.dumps({"id": 7, "messages": CHAT}), str(tmp_path))
    assert rec.messages == CHAT and rec.meta == {"id": 7} and rec.source == "f.jsonl:3"
    rec2 = parse_record("f.jsonl", 4, json.dumps(CHAT), str(tmp_path))
    assert rec2.messages == CHAT and rec2.meta == {} and rec2.loss == [None, None]


def test_content_parts_images_and_placeholders(tmp_path, make_image):
    make_image("a.png", 8, 8)
    make_image("b.png", 8, 8)
    parts = [
        {"type": "image_url", "image_url": {"url": "a.png", "image_wh": [8, 8]}},
        {"type": "image", "image": {"url": "b.png"}},
        {"type": "text", "text": "Compare."},
    ]
    msgs = [{"role": "user", "content": parts, "loss": True}, {"role": "assistant", "content": "Same.", "loss": False}]
    rec = parse_record("f.jsonl", 1, json.dumps({"messages": msgs}), str(tmp_path))
    # no placeholder in the text: the images go first, one per line
    assert rec.messages[0]["content"] == f"{IMG_PLACEHOLDER}\n{IMG_PLACEHOLDER}\nCompare."
    assert [im.wh for im in rec.images] == [(8, 8), None]
    assert rec.images[0].path == str(tmp_path / "a.png")
    assert rec.loss == [True, False] and "loss" not in rec.messages[0]
    # explicit placeholders are kept where they are
    parts[2]["text"] = f"Left {IMG_PLACEHOLDER} right {IMG_PLACEHOLDER}"
    rec = parse_record("f.jsonl", 1, json.dumps({"messages": msgs}), str(tmp_path))
    assert rec.messages[0]["content"] == parts[2]["text"]


def test_folder_lists_jsonl_sorted(tmp_path, write_jsonl):
    write_jsonl("d/b.jsonl", [CHAT])
    write_jsonl("d/sub/a.jsonl", [CHAT])
    write_jsonl("d/a.jsonl", [CHAT])
    (tmp_path / "d" / "notes.txt").write_text("x")
    got = [p.replace(str(tmp_path / "d") + "/", "") for p in list_files(str(tmp_path / "d"))]
    assert got == ["a.jsonl", "b.jsonl", "sub/a.jsonl"]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [', "malformed JSON"),
        ('{"id": 1}', "no 'messages'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nope.png"}}]}]}',
         "image file not found"),
        ('{"messages": [{"role": "user", "content": "<IMG_CONTEXT> what?"}]}', "placeholder"),
        ('{"messages": []}', "non-empty"),
    ],
)
def test_bad_records_name_file_line_and_problem(tmp_path, line, problem):
    with pytest.raises(DataError) as e:
        parse_record("data/x.jsonl", 12, line, str(tmp_path))
    assert str(e.value).startswith("data/x.jsonl:12: ") and problem in str(e.value)


def test_placeholder_count_mismatch(tmp_path, make_image):
    make_image("a.png", 4, 4)
    msg = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "a.png"}},
        {"type": "text", "text": f"{IMG_PLACEHOLDER}{IMG_PLACEHOLDER} two?"},
    ]}
    with pytest.raises(DataError, match=r"x.jsonl:5: message 0: 2 <IMG_CONTEXT> placeholder\(s\) for 1 image"):
        parse_record("x.jsonl", 5, json.dumps({"messages": [msg]}), str(tmp_path))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl:0: empty file"):
        list(iter_lines(str(p)))


def test_on_error_raise_and_skip(qwen_tok, write_jsonl, run_spec, caplog):
    good = {"messages": CHAT}
    path = write_jsonl("mixed.jsonl", [good, "{not json", good, {"messages": [{"role": "bot", "content": "x"}]}, good])
    spec = run_spec([("mixed", path)])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: malformed JSON"):
        load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model)
    spec = run_spec([("mixed", path)], on_error="skip")
    with caplog.at_level("WARNING", logger="xtune.data"):
        ds = load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model)
    assert len(ds) == 3 and len(ds.errors) == 2
    assert "mixed.jsonl:2:" in ds.errors[0] and "mixed.jsonl:4:" in ds.errors[1]
    assert "2 bad record(s) skipped" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_empty_file_skipped_with_on_error_skip(qwen_tok, tmp_path, write_jsonl, run_spec):
    write_jsonl("d/a.jsonl", [{"messages": CHAT}])
    (tmp_path / "d" / "b.jsonl").write_text("")
    spec = run_spec([("d", tmp_path / "d")], on_error="skip")
    ds = load_dataset(spec.data.datasets[0], qwen_tok, spec.data, spec.model)
    assert len(ds) == 1 and "b.jsonl:0: empty file" in ds.errors[0]
