"""Reading JSONL conversations into validated, normalised records.

Accepted lines: `{"messages": [...], ...}` (other keys are kept as metadata; `tools` is passed to
the chat template) or a bare JSON list of messages. A message's `content` is a string or a list
of parts (`text`, `image_url` / `image`). Images are replaced by one `<IMG_CONTEXT>` placeholder
each; a message with images and no placeholders gets them in front of its text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xtune.errors import DataError

ROLES = ("system", "user", "assistant", "tool", "pretrain")
IMG_PLACEHOLDER = "<IMG_CONTEXT>"
# Content part types of the OpenAI / TRL message format that xtune cannot train on yet.
UNSUPPORTED_PARTS = ("video", "video_url", "audio", "audio_url", "input_audio", "file")


@dataclass
class ImageSpec:
    """An image named by a record: its resolved path and, when the record gave it, its size."""

    path: str
    wh: tuple[int, int] | None = None


@dataclass
class Record:
    """One conversation: messages with string content (placeholders marking images)."""

    messages: list[dict[str, Any]]
    images: list[ImageSpec]
    # Per message: True / False from its "loss" key, None for the default rule.
    loss: list[bool | None]
    source: str  # "file:line"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pretrain(self) -> bool:
        return self.messages[0]["role"] == "pretrain"


# Kinds of skipped records (data.on_error=skip), told apart by the messages this module and the tokeniser
# write: (kind, a fragment only that kind's messages contain), first match wins.
SKIP_KINDS = (
    ("encoding", ": not UTF-8"),
    ("json", ": malformed JSON"),
    ("unsupported part", "input is not supported yet"),
    ("image", "image"),
    ("chat template", "the chat template"),
)


def skip_kind(message: str) -> str:
    """The kind of a skipped record's message: encoding, json, unsupported part, image, chat template or record."""
    for kind, fragment in SKIP_KINDS:
        if fragment in message:
            return kind
    return "record"


def count_kinds(messages: list[str]) -> dict[str, int]:
    """{kind: count} over skipped records' messages, most frequent first."""
    counts: dict[str, int] = {}
    for m in messages:
        k = skip_kind(m)
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def list_files(path: str) -> list[str]:
    """A file, or every *.jsonl below a folder (sorted, so the order never depends on the filesystem)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.jsonl") if f.is_file())
        if not files:
            raise DataError(f"{path}: no *.jsonl file in this folder")
        return files
    raise DataError(f"{path}: no such file or folder")


def iter_lines(file: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for every non-blank line; an empty file is an error.

    Lines are decoded one by one, so a byte that is not UTF-8 is reported at its line and byte offset
    (with on_error=skip that line alone is skipped, by `parse_record`)."""
    n = 0
    offset = 0
    try:
        f = open(file, "rb")
    except OSError as e:
        raise DataError(f"{file}: cannot read it ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = EncodingProblem(offset + e.start, raw[e.start:e.start + 1])
            offset += len(raw)
            if line.strip():
                n += 1
                yield lineno, line
    if n == 0:
        raise DataError(f"{file}:0: empty file (no records)")


class EncodingProblem(str):
    """A line that is not UTF-8, in place of its text: where the first bad byte is. Rejected by
    `parse_record` with file:line, so that on_error=skip skips this line only."""

    def __new__(cls, offset: int, byte: bytes):
        self = super().__new__(cls, "?")
        self.offset, self.byte = offset, byte
        return self

    def __getnewargs__(self):  # pickled to tokenizer worker processes
        return self.offset, self.byte


def load_line(file: str, lineno: int, line: str):
    """(where, the decoded JSON value, fail) of one line; `fail(msg)` makes a DataError naming file:line."""
    where = f"{file}:{lineno}"

    def fail(msg: str) -> DataError:
        return DataError(f"{where}: {msg}")

    if isinstance(line, EncodingProblem):
        raise fail(f"not UTF-8: byte 0x{line.byte.hex()} at byte offset {line.offset} of the file; "
                   "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    try:
        return where, json.loads(line), fail
    except json.JSONDecodeError as e:
        raise fail(f"malformed JSON ({e.msg} at column {e.colno})") from None


def parse_record(file: str, lineno: int, line: str, media_root: str) -> Record:
    """Parse and validate one JSONL line. Raises DataError naming file:line and the problem."""
    where, obj, fail = load_line(file, lineno, line)
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        if "messages" not in obj:
            raise fail("no 'messages' key")
        meta = {k: v for k, v in obj.items() if k != "messages"}
        raw = obj["messages"]
    else:
        raw = obj
    if not isinstance(raw, list) or not raw:
        raise fail("'messages' must be a non-empty list of messages")

    messages, images, loss = [], [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m:
            raise fail(f"message {i} is not an object with a 'role'")
        role = m["role"]
        if role not in ROLES:
            raise fail(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        text, imgs = _content(m.get("content"), media_root, lambda msg: fail(f"message {i}: {msg}"))  # noqa: B023 (called at once)
        msg = {k: v for k, v in m.items() if k not in ("content", "loss")}
        msg["content"] = text
        messages.append(msg)
        images.extend(imgs)
        flag = m.get("loss")
        if flag is not None and not isinstance(flag, bool):
            raise fail(f"message {i}: 'loss' must be true or false, got {flag!r}")
        loss.append(flag)
    roles = {m["role"] for m in messages}
    if "pretrain" in roles and roles != {"pretrain"}:
        raise fail("a 'pretrain' message cannot be mixed with chat roles in one record")
    return Record(messages, images, loss, where, meta)


def _content(content: Any, media_root: str, fail) -> tuple[str, list[ImageSpec]]:
    """Flatten content parts to one string with one placeholder per image."""
    if content is None:
        return "", []
    if isinstance(content, str):
        n = content.count(IMG_PLACEHOLDER)
        if n:
            raise fail(f"{n} {IMG_PLACEHOLDER} placeholder(s) but no image")
        return content, []
    if not isinstance(content, list):
        raise fail(f"'content' must be a string or a list of parts, got {type(content).__name__}")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise fail("a text part needs a string 'text'")
            texts.append(part["text"])
        elif kind in ("image_url", "image"):
            images.append(_image(part.get(kind), media_root, fail))
        elif kind in UNSUPPORTED_PARTS:
            raise fail(f"a {kind!r} content part: {kind} input is not supported yet (text and images only); "
                       "remove the part or the record")
        else:
            raise fail(f"unknown content part {part!r:.80}")
    text = "".join(texts)
    n = text.count(IMG_PLACEHOLDER)
    if images and n == 0:
        # Convention of InternVL-style data: the images come first, one per line.
        text = (IMG_PLACEHOLDER + "\n") * len(images) + text
    elif n != len(images):
        raise fail(f"{n} {IMG_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    return text, images


def _image(obj: Any, media_root: str, fail) -> ImageSpec:
    if isinstance(obj, str):
        obj = {"url": obj}
    if not isinstance(obj, dict):
        raise fail("an image part needs an object with 'url'")
    url = obj.get("url") or obj.get("path")
    if not isinstance(url, str) or not url:
        raise fail("an image part needs a 'url'")
    if "://" in url and not url.startswith("file://"):
        raise fail(f"image {url!r:.120} is a URL: images are read from local files only; download it and "
                   "give its path (relative to the dataset's media_root)")
    if url.startswith("data:"):
        raise fail("an inline data: URL image is not supported; save the image to a file and give its path")
    if url.startswith("file://"):
        url = url[len("file://"):]
    path = url if os.path.isabs(url) else os.path.join(media_root, url)
    if not os.path.isfile(path):
        raise fail(f"image file not found: {path}")
    wh = obj.get("image_wh")
    if wh is not None:
        if not (isinstance(wh, (list, tuple)) and len(wh) == 2 and all(isinstance(v, int) and v > 0 for v in wh)):
            raise fail(f"'image_wh' must be [width, height] in pixels, got {wh!r}")
        wh = (int(wh[0]), int(wh[1]))
    return ImageSpec(path, wh)
