"""Bad input never shows a traceback: one table of what users get wrong across config, data, images, chat
templates, model folders and checkpoints. For every row: exit code 2, the location (key, file:line, image
path, model-folder file or checkpoint) in the message, and no "Traceback" on stdout or stderr.

The rows call the real `xtune` command line in this process (`cli.app`, as `python -m xtune` does, with its
output captured), so the table costs seconds rather than one interpreter start per row; an exception that
escapes the CLI is printed as Python would print it, and so fails the row. Every row's files are tiny and
written here. A subset then runs on 2 ranks (`parallel.nproc_per_node=2`, real processes), where the
message must appear exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import traceback
from dataclasses import dataclass

import pytest

from tests.reliability.helpers import GOOD, IMAGE, ROOT, image_msg, quick_run, run_all, write_lines

TOKENIZER = ROOT / "src" / "xtune" / "assets" / "tokenizers" / "qwen3_tiny"


@dataclass
class Out:
    returncode: int
    stdout: str
    stderr: str


def xtune_here(*args) -> Out:
    """`xtune ARGS` in this process: its exit code and what it printed (a stray exception as a traceback)."""
    from xtune.cli import app

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers = list(root.handlers)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = app([str(a) for a in args], prog_name="xtune", standalone_mode=False)
        except SystemExit as e:
            code = e.code
        except BaseException:  # noqa: BLE001 - what the interpreter would print and exit with
            traceback.print_exc()
            code = 1
        finally:
            for h in set(root.handlers) - set(handlers):  # the run dir's log handlers of this call
                root.removeHandler(h)
                h.close()
    code = getattr(code, "exit_code", code)
    return Out(0 if code is None else int(code), out.getvalue(), err.getvalue())


# ------------------------------------------------------------------------------------------ row files
def data_row(lines, *extra):
    """A row whose dataset file is `lines`: ({t} = the row's folder, {f} = the file)."""
    def setup(t):
        f = write_lines(t / "bad.jsonl", lines)
        return quick_run(t, f"data.datasets=[{{name:x,path:{f}}}]", *extra), {"f": f}
    return setup


def text(role, content):
    return {"role": role, "content": content}


def chat(*content_parts, answer="A circle."):
    return {"messages": [{"role": "user", "content": list(content_parts)}, text("assistant", answer)]}


def image_part(url, **extra):
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def image_row(write_image, **extra):
    """A record naming an image that `write_image(path)` writes (a damaged copy of the demo image)."""
    def setup(t):
        img = t / ("pic" + IMAGE.suffix)
        write_image(img)
        f = write_lines(t / "bad.jsonl", GOOD[:2] + [image_msg(1, img, **extra)])
        return quick_run(t, f"data.datasets=[{{name:x,path:{f}}}]", "model=intern_s1_tiny"), {"f": f, "img": img}
    return setup


def template_row(template, lines=None, in_config=False):
    """The demo run with a copy of its tokenizer whose chat template is `template`: in `chat_template.jinja`
    (transformers 5's layout), or in `tokenizer_config.json` with `in_config`."""
    def setup(t):
        tok = t / "tok"
        shutil.copytree(TOKENIZER, tok)
        (tok / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        if in_config:
            cfg["chat_template"] = template
        else:
            (tok / "chat_template.jinja").write_text(template)
        (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
        f = write_lines(t / "data.jsonl", lines or GOOD[:4])
        return quick_run(t, f"data.datasets=[{{name:x,path:{f}}}]", f"model.tokenizer={tok}"), {"f": f, "tok": tok}
    return setup


QWEN3_TPL = json.loads((TOKENIZER / "tokenizer_config.json").read_text()).get("chat_template") or \
    (TOKENIZER / "chat_template.jinja").read_text()


def config_row(*overrides, files=None):
    """Overrides of the demo run ({t}: the row's folder); `files(t)` writes what they name."""
    def setup(t):
        if files:
            files(t)
        return quick_run(t, "data.datasets=[{name:x,path:" + str(t / "ok.jsonl") + "}]",
                         *[o.format(t=t) for o in overrides]), {}
    return setup


# A tiny real Qwen3 folder (transformers' save_pretrained), written once and copied per row.
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("model") / "qwen3"
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    Qwen3ForCausalLM(cfg).save_pretrained(path, max_shard_size="100KB")  # sharded: an index and 2+ files
    assert (path / "model.safetensors.index.json").is_file()
    return path


def model_row(damage, family="qwen3", tokenizer="builtin:qwen3_tiny", model="auto"):
    """The demo data with `model.load_from` = a copy of the tiny folder that `damage(folder)` broke."""
    def setup(t, model_folder):
        m = t / "model"
        shutil.copytree(model_folder, m)
        damage(m)
        f = write_lines(t / "ok.jsonl", GOOD[:4])
        extra = [f"model={model}", f"model.load_from={m}", f"model.family={family}", f"model.tokenizer={tokenizer}"]
        return quick_run(t, f"data.datasets=[{{name:x,path:{f}}}]", *extra), {"m": m}
    setup.needs_model = True
    return setup


def index(m):
    return json.loads((m / "model.safetensors.index.json").read_text())


def write_index(m, idx):
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))


def drop_from_index(m):
    idx = index(m)
    del idx["weight_map"]["model.norm.weight"]
    write_index(m, idx)


def misplace_in_index(m):
    idx = index(m)
    files = sorted(set(idx["weight_map"].values()))
    key = next(k for k, v in idx["weight_map"].items() if v == files[0])
    idx["weight_map"][key] = files[1]
    write_index(m, idx)


def first_shard(m):
    return m / sorted(set(index(m)["weight_map"].values()))[0]


def cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])


def break_tokenizer_json(m):
    shutil.copytree(TOKENIZER, m, dirs_exist_ok=True)
    (m / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short


def to_pytorch_bin(m):
    """The folder as older transformers saved it: one pickled pytorch_model.bin, no safetensors."""
    for p in m.glob("model*.safetensors*"):
        p.unlink()
    (m / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle xtune must not load")


def png_header(width, height):
    """A PNG whose header says width x height (the probe reads headers only): signature, IHDR, IEND."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def set_config(m, **kv):
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(kv)
    (m / "config.json").write_text(json.dumps(cfg))


# A checkpoint of a one-step run, damaged per row and handed to train.resume / xtune export.
@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    t = tmp_path_factory.mktemp("ckpt")
    f = write_lines(t / "ok.jsonl", GOOD[:4])
    args = quick_run(t, f"data.datasets=[{{name:x,path:{f}}}]", "train.save_every=1")
    out = xtune_here(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return t / "run"


def ckpt_row(damage, command="resume"):
    def setup(t, run):
        r = t / "run"
        shutil.copytree(run, r)
        ck = r / "checkpoints" / "step-1"
        damage(ck)
        if command == "export":
            return ["export", ck, t / "hf"], {"ck": ck}
        f = run.parent / "ok.jsonl"  # the checkpoint's own data: a resume may not change it
        args = quick_run(t, f"data.datasets=[{{name:x,path:{f}}}]", "train.max_steps=2", f"train.resume={ck}")
        return [a for a in args if not a.startswith("train.work_dir=")] + [f"train.work_dir={r}"], {"ck": ck}
    setup.needs_checkpoint = True
    return setup


def biggest_shard(ck):
    return max(ck.glob("*.distcp"), key=lambda p: p.stat().st_size)


class _FillingFile:
    """A file opened for writing whose writes fail with ENOSPC once the shared byte budget is spent."""

    def __init__(self, f, budget: list):
        self._f, self._budget = f, budget

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def disk_fills_under(folder, budget_bytes: int):
    """The disk fills up for files written under `folder` (fault injected at the OS boundary: `open`)."""
    import builtins

    real, budget = builtins.open, [budget_bytes]

    def filling_open(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and "w" in mode and str(file).startswith(str(folder)):
            return _FillingFile(f, budget)
        return f

    builtins.open = filling_open
    try:
        yield
    finally:
        builtins.open = real


def with_fault(setup, fault):
    setup.fault = fault
    return setup


def cache_fills_up(t):
    return disk_fills_under(t / "cache", 64)


def ok_data(t):
    write_lines(t / "ok.jsonl", GOOD[:4])


def bad_recipe(text_, name="my.yaml"):
    def files(t):
        ok_data(t)
        (t / name).write_text(text_)
    return files


def file_in_the_way(t):
    ok_data(t)
    (t / "afile").write_text("not a folder\n")


# (id, setup, fragments of the message: {t} the row's folder and the names setup returns)
ROWS = [
    # -- config: composed and validated before anything is built
    ("recipe_yaml_syntax", config_row("recipe={t}/my.yaml", files=bad_recipe("train:\n  max_steps: [1, 2\n")),
     ["{t}/my.yaml", "line"]),
    ("recipe_not_mapping", config_row("recipe={t}/my.yaml", files=bad_recipe("- a\n- b\n")),
     ["{t}/my.yaml: a recipe must be a YAML mapping"]),
    ("recipe_file_missing", config_row("recipe={t}/none.yaml", files=ok_data), ["recipe={t}/none.yaml: no such file"]),
    ("override_syntax", config_row("train.max_steps=[1,", files=ok_data), ["train.max_steps=[1,"]),
    ("builtin_tokenizer_unknown", config_row("model.tokenizer=builtin:nope", files=ok_data),
     ["model.tokenizer=builtin:nope: no such built-in tokenizer"]),
    ("media_root_missing", config_row("data.datasets=[{{name:x,path:{t}/ok.jsonl,media_root:{t}/media}}]",
                                      files=ok_data), ["media_root={t}/media: no such folder"]),
    ("resume_missing", config_row("train.resume={t}/nope", files=ok_data),
     ["train.resume={t}/nope: no such checkpoint folder"]),
    ("vocab_smaller_than_tokenizer", config_row("model.arch.vocab_size=64", files=ok_data),
     ["model vocab_size 64 (model.arch) is smaller than the tokenizer's largest id"]),
    ("work_dir_under_a_file", config_row("train.work_dir={t}/afile/run", files=file_in_the_way),
     ["train.work_dir={t}/afile/run: cannot write there", "Not a directory"]),
    # sysfs refuses mkdir to everyone (root included): a real permission error wherever the tests run
    ("work_dir_permission", config_row("train.work_dir=/sys/xtune-bad-work-dir", files=ok_data),
     ["train.work_dir=/sys/xtune-bad-work-dir: cannot write there", "Operation not permitted"]),
    ("cache_dir_under_a_file", config_row("data.cache_dir={t}/afile/cache", files=file_in_the_way),
     ["data.cache_dir: cannot write the tokenised data to {t}/afile/cache", "Not a directory"]),
    ("cache_dir_permission", config_row("data.cache_dir=/sys/xtune-bad-cache", files=ok_data),
     ["data.cache_dir: cannot write the tokenised data to /sys/xtune-bad-cache", "Operation not permitted"]),
    ("added_unknown_key", config_row("+trian.seed=3", files=ok_data),
     ["trian.seed=3: unknown key 'trian' in the top level. Did you mean 'train'?"]),
    ("recipe_plain_text", config_row("recipe={t}/passwd", files=bad_recipe("root:x:0:0:root:/root:/bin/bash\n", "passwd")),
     ["{t}/passwd: a recipe must be a YAML mapping"]),
    ("misspelt_key", config_row("train.max_stpes=3", files=ok_data),
     ["train.max_stpes=3: unknown key 'max_stpes' in train", "Did you mean 'max_steps'?"]),
    ("wrong_type", config_row("train.save_every=often", files=ok_data),
     ["train.save_every=often", "could not be converted to Integer"]),
    ("bad_group_option", config_row("optim=adamww", files=ok_data), ["optim=adamww: no such optim", "Did you mean 'adamw'?"]),
    ("bad_choice", config_row("data.on_error=ignore", files=ok_data),
     ["data.on_error=ignore: not allowed; choose one of raise, skip"]),
    ("cross_field", config_row("train.epochs=2", files=ok_data), ["give exactly one of train.epochs and train.max_steps"]),
    ("dataset_file_missing", config_row("data.datasets=[{{name:x,path:{t}/nope.jsonl}}]"),
     ["data.datasets[0] (x).path={t}/nope.jsonl: no such file or folder"]),
    ("load_from_missing", config_row("model.load_from={t}/no_model", files=ok_data),
     ["model.load_from={t}/no_model: no such folder"]),
    ("load_from_not_hf", config_row("model.load_from={t}/no_config", files=lambda t: (ok_data(t), (t / "no_config").mkdir())),
     ["model.load_from={t}/no_config: no config.json there"]),
    ("tokenizer_files_missing", config_row("model.tokenizer={t}/no_tok", files=lambda t: (
        ok_data(t), (t / "no_tok").mkdir(), (t / "no_tok" / "README.md").write_text("tokenizer went missing\n"))),
     ["model.tokenizer={t}/no_tok: no tokenizer files there"]),
    ("disk_full_while_caching", with_fault(config_row(files=ok_data), cache_fills_up),
     ["data.cache_dir: cannot write the tokenised data to {t}/cache (No space left on device)",
      "the disk is full"]),
    # -- data: file:line (byte offset for encoding), the message index, what to do
    ("not_utf8", data_row(GOOD[:2] + [b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'] + GOOD[2:4]),
     ["{f}:3: not UTF-8: byte 0xe9 at byte offset", "save the file as UTF-8"]),
    ("not_utf8_first_line", data_row([b"\xff\xfe{}"] + GOOD[:2]), ["{f}:1: not UTF-8: byte 0xff at byte offset 0"]),
    ("folder_without_jsonl", lambda t: ((t / "data").mkdir(), (t / "data" / "notes.txt").write_text("x"),
                                        quick_run(t, f"data.datasets=[{{name:x,path:{t}/data}}]"), {})[2:],
     ["{t}/data: no data file in this folder"]),
    ("malformed_json", data_row(GOOD[:2] + ['{"messages": [{"role": "user", "content": "hi"}'] + GOOD[2:4]),
     ["{f}:3:", "malformed JSON"]),
    ("no_messages", data_row(GOOD[:4] + [{"id": "x", "conversation": [text("user", "hi")]}]),
     ["{f}:5:", "no 'messages' key"]),
    ("unknown_role", data_row(GOOD[:1] + [{"messages": [text("user", "hi"), text("bot", "yo")]}]),
     ["{f}:2: message 1: unknown role 'bot'"]),
    ("empty_file", data_row([]), ["{f}:0:", "empty file"]),
    ("image_missing", data_row(GOOD[:3] + [image_msg(1, "images/nowhere.png")]),
     ["{f}:4:", "image file not found", "images/nowhere.png"]),
    ("placeholders_vs_images", data_row(GOOD[:2] + [image_msg(2, IMAGE)]),
     ["{f}:3:", "2 <IMG_CONTEXT> placeholder(s) for 1 image(s)"]),
    ("content_not_text", data_row(GOOD[:1] + [{"messages": [text("user", 5), text("assistant", "x")]}]),
     ["{f}:2: message 0: 'content' must be a string or a list of parts, got int"]),
    ("loss_not_bool", data_row(GOOD[:1] + [{"messages": [text("user", "a"), {**text("assistant", "b"), "loss": 1}]}]),
     ["{f}:2: message 1: 'loss' must be true or false"]),
    ("pretrain_mixed", data_row([{"messages": [text("pretrain", "a"), text("user", "b")]}]),
     ["{f}:1: a 'pretrain' message cannot be mixed with chat roles"]),
    ("empty_messages", data_row(GOOD[:2] + [{"messages": []}]), ["{f}:3: 'messages' must be a non-empty list"]),
    ("message_without_role", data_row(GOOD[:2] + [{"messages": [{"content": "hi"}]}]),
     ["{f}:3: message 0 is not an object with a 'role'"]),
    ("placeholder_no_image", data_row(GOOD[:2] + [{"messages": [text("user", "<IMG_CONTEXT> hi"), text("assistant", "x")]}]),
     ["{f}:3: message 0: 1 <IMG_CONTEXT> placeholder(s) but no image"]),
    ("text_part_without_text", data_row(GOOD[:2] + [chat({"type": "text"})]),
     ["{f}:3: message 0: a text part needs a string 'text'"]),
    # -- images and other content parts
    ("image_http_url", data_row(GOOD[:1] + [chat(image_part("http://example.com/cat.png"))]),
     ["{f}:2: message 0: image 'http://example.com/cat.png' is a URL", "download it"]),
    ("image_https_url", data_row(GOOD[:1] + [chat(image_part("https://example.com/a.jpg"))]),
     ["{f}:2: message 0: image 'https://example.com/a.jpg' is a URL"]),
    ("image_data_url", data_row(GOOD[:1] + [chat(image_part("data:image/png;base64,iVBORw0KGgo="))]),
     ["{f}:2: message 0: an inline data: URL image is not supported"]),
    ("image_part_without_url", data_row(GOOD[:1] + [chat({"type": "image_url", "image_url": {}})]),
     ["{f}:2: message 0: an image part needs a 'url'"]),
    ("video_part", data_row(GOOD[:1] + [chat({"type": "video", "video": "clip.mp4"})]),
     ["{f}:2: message 0: a 'video' content part: video input is not supported yet"]),
    ("audio_part", data_row(GOOD[:1] + [chat({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})]),
     ["{f}:2: message 0: a 'input_audio' content part: input_audio input is not supported yet"]),
    ("unknown_part", data_row(GOOD[:1] + [chat({"type": "hologram"})]), ["{f}:2: message 0: unknown content part"]),
    ("image_not_an_image", image_row(lambda p: p.write_text("this is not an image\n")),
     ["{f}:3: image {img} is not a readable image"]),
    ("image_zero_bytes", image_row(lambda p: p.write_bytes(b"")), ["{f}:3: image {img} is empty (0 bytes)"]),
    ("image_truncated", image_row(lambda p: p.write_bytes(IMAGE.read_bytes()[: IMAGE.stat().st_size // 2])),
     ["{f}:3: image {img} is truncated"]),
    ("image_header_only", image_row(lambda p: p.write_bytes(IMAGE.read_bytes()[:64])), ["{f}:3: image {img}"]),
    ("image_is_a_folder", image_row(lambda p: p.mkdir()), ["{f}:3: message 0: image file not found: {img}"]),
    ("image_over_pixel_limit", image_row(lambda p: p.write_bytes(png_header(40000, 40000))),
     ["{f}:3: image {img} is 40000 x 40000 pixels, over PIL's limit", "not decoded"]),
    ("image_wh_malformed", image_row(lambda p: shutil.copyfile(IMAGE, p), image_wh=[0, "x"]),
     ["{f}:3: message 0: 'image_wh' must be [width, height]"]),
    # -- chat templates (the tokenizer folder's): the folder, the template line and jinja2's reason
    # A template the sandbox refuses or that fails on the data is the user's to fix: the record, the folder,
    # the template line and jinja2's reason (a template failing on every chat fails on the first record).
    ("template_class_access", template_row("{{ messages[0].__class__.__mro__ }}" + QWEN3_TPL),
     ["{f}:1: the chat template of {tok} failed at template line 1: SecurityError: "
      "access to attribute '__class__' of 'dict' object is unsafe"]),
    ("template_globals_access", template_row("{{ raise_exception.__globals__['os'] }}" + QWEN3_TPL),
     ["{f}:1: the chat template of {tok} failed at template line 1: SecurityError: "
      "access to attribute '__globals__' of 'function' object is unsafe"]),
    ("template_list_append", template_row("{{ messages.append(1) }}" + QWEN3_TPL),
     ["{f}:1: the chat template of {tok} failed at template line 1: SecurityError: "
      "access to attribute 'append' of 'list' object is unsafe"]),
    ("template_list_pop", template_row("{% if messages | length > 1 %}{{ messages.pop() }}{% endif %}" + QWEN3_TPL),
     ["{f}:1: the chat template of {tok} failed at template line 1: SecurityError: "
      "access to attribute 'pop' of 'list' object is unsafe"]),
    ("template_type_error", template_row("{% for m in messages %}\n{{ m.content + 1 }}{% endfor %}"),
     ["{f}:1: the chat template of {tok} failed at template line 2: TypeError: "
      'can only concatenate str (not "int") to str']),
    ("template_syntax_error", template_row("{% for m in messages %}\n{{ m.content }", in_config=True),
     ["{f}:1: the chat template of {tok} failed at template line 2: TemplateSyntaxError"]),
    ("template_without_generation_prompt", template_row("{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                                                       "</s>{% endfor %}"),
     ["{f}:1: the chat template has no generation prompt; cannot find assistant turns"]),
    ("template_raise_for_a_record",
     template_row("{% for m in messages %}{% if m.content == 'BOOM' %}{{ raise_exception('no BOOM here') }}"
                  "{% endif %}{% endfor %}" + QWEN3_TPL,
                  GOOD[:2] + [{"messages": [text("user", "BOOM"), text("assistant", "x")]}]),
     ["{f}:3: the chat template of {tok} failed", "no BOOM here"]),
    # -- model folders: the folder's file and what is wrong with it
    ("config_json_not_json", model_row(lambda m: (m / "config.json").write_text('{"model_type": "qwen3",')),
     ["model.load_from={m}: config.json is not valid JSON"]),
    ("config_unknown_model_type", model_row(lambda m: set_config(m, model_type="qwen9"), family="auto"),
     ["model_type qwen9 cannot be trained packed safely"]),
    ("config_model_type_mismatch", model_row(lambda m: set_config(m, model_type="llama")),
     ["model.family=qwen3 but {m}/config.json has model_type llama"]),
    ("index_not_json", model_row(lambda m: cut(m / "model.safetensors.index.json", lambda n: n // 2)),
     ["model.load_from={m}: model.safetensors.index.json is not valid JSON"]),
    ("index_names_missing_shard", model_row(lambda m: first_shard(m).unlink()),
     ["{m}: shard(s) listed in model.safetensors.index.json are missing"]),
    ("weight_missing_from_index", model_row(drop_from_index), ["{m} lacks 1 weights of the model", "model.norm.weight"]),
    ("index_points_to_wrong_shard", model_row(misplace_in_index), ["which model.safetensors.index.json puts there"]),
    ("safetensors_truncated", model_row(lambda m: cut(first_shard(m), lambda n: n - 100)), ["{m}/model-", "truncated"]),
    ("safetensors_cut_in_header", model_row(lambda m: cut(first_shard(m), lambda n: 40)), ["{m}/model-", "truncated"]),
    ("safetensors_too_short", model_row(lambda m: cut(first_shard(m), lambda n: 3)),
     ["{m}/model-", "not a safetensors file (too short: 3 bytes)"]),
    ("arch_contradicts_config", model_row(lambda m: None, model="qwen3_tiny"),
     ["model.arch.hidden_size=128 contradicts {m}/config.json (hidden_size: 32)",
      "model.arch.num_hidden_layers=4 contradicts {m}/config.json (num_hidden_layers: 2)"]),
    ("pickle_weights_only", model_row(to_pytorch_bin),
     ["model.load_from={m}: the weights are pytorch_model.bin (a pickle), and xtune reads safetensors only",
      "save_pretrained"]),
    ("no_weights", model_row(lambda m: [p.unlink() for p in m.glob("model*")]), ["model.load_from={m}: no weights there"]),
    ("tokenizer_json_corrupt", model_row(break_tokenizer_json, tokenizer="null"),
     ["could not load the tokenizer ({m})"]),
    # -- checkpoints, through the CLI (train.resume and xtune export)
    ("ckpt_no_marker", ckpt_row(lambda ck: (ck / "meta.json").unlink()), ["checkpoint {ck} is incomplete (no meta.json)"]),
    ("ckpt_marker_garbage", ckpt_row(lambda ck: (ck / "meta.json").write_text("{garbage")), ["{ck}"]),
    ("ckpt_shard_truncated", ckpt_row(lambda ck: cut(biggest_shard(ck), lambda n: n // 2)),
     ["checkpoint {ck} is corrupt", "truncated"]),
    ("export_not_a_checkpoint", ckpt_row(lambda ck: (ck / "meta.json").unlink(), command="export"), ["{ck}"]),
]


# Every command that takes overrides passes the same gate (xtune.gate: compose -> validate -> load the
# tokenizer), then does its own work. A row runs through every command that reaches the stage its mistake
# is found at; a new command adds its line here (and the stage it reaches) and inherits the rows.
STAGES = ("compose", "validate", "load", "data", "run")
COMMANDS = {
    "sft": "run",
    "dpo": "load",             # the preference data stage has its own table (tests/unit/test_data_preference.py)
    "data_inspect": "data",    # reads and tokenises the data, never builds the model
    "config_show": "compose",  # prints what an invalid run would get: only what does not compose stops it
}
# The stage of the config and model-folder rows (data, image and template rows are "data"; checkpoint rows "run").
STAGE = {
    **dict.fromkeys(["recipe_yaml_syntax", "recipe_not_mapping", "recipe_file_missing", "override_syntax",
                     "added_unknown_key", "recipe_plain_text", "misspelt_key", "wrong_type", "bad_group_option"],
                    "compose"),
    **dict.fromkeys(["builtin_tokenizer_unknown", "media_root_missing", "resume_missing", "bad_choice", "cross_field",
                     "dataset_file_missing", "load_from_missing", "load_from_not_hf", "tokenizer_files_missing",
                     "config_json_not_json", "config_unknown_model_type", "config_model_type_mismatch",
                     "index_not_json", "arch_contradicts_config", "no_weights", "pickle_weights_only"], "validate"),
    **dict.fromkeys(["vocab_smaller_than_tokenizer", "tokenizer_json_corrupt"], "load"),
    **dict.fromkeys(["cache_dir_under_a_file", "cache_dir_permission", "disk_full_while_caching"], "data"),
    **dict.fromkeys(["work_dir_under_a_file", "work_dir_permission"], "run"),
}


def stage_of(row) -> str:
    name, setup = row[0], row[1]
    if name in STAGE:
        return STAGE[name]
    return "run" if getattr(setup, "needs_model", False) or getattr(setup, "needs_checkpoint", False) else "data"


def as_command(args, command):
    """A row's `xtune sft ...` line as `command` runs it."""
    if command == "sft":
        return args
    rest = args[1:]
    if command == "dpo":  # the preference demo, its rows short enough for a pair to fit one packed row
        return ["dpo", "recipe=demo_dpo", *[a for a in rest if a != "recipe=demo"], "data.sample_max_length=128"]
    return [*command.split("_"), *rest]


CASES = [(row, command) for row in ROWS for command, reach in COMMANDS.items()
         if STAGES.index(stage_of(row)) <= STAGES.index(reach)]


def test_the_table_has_40_rows_across_every_kind():
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)
    assert all(stage_of(r) in STAGES for r in ROWS)


def test_every_command_runs_the_rows_of_its_stages():
    """The gate is shared: each command that takes overrides gets the compose rows at least, data inspect the
    data rows too, and the training commands the tokenizer rows."""
    via = {c: {r[0] for r, cc in CASES if cc == c} for c in COMMANDS}
    assert {"misspelt_key", "recipe_plain_text", "added_unknown_key"} <= via["config_show"]
    assert {"tokenizer_json_corrupt", "not_utf8", "image_over_pixel_limit"} <= via["data_inspect"]
    assert {"tokenizer_json_corrupt", "vocab_smaller_than_tokenizer", "bad_choice"} <= via["dpo"]
    assert via["sft"] == {r[0] for r in ROWS}


@pytest.mark.parametrize("row, command", CASES, ids=[f"{r[0]}-{c}" for r, c in CASES])
def test_bad_input_exits_2_naming_where_without_traceback(request, tmp_path, row, command):
    _, setup, fragments = row
    t = tmp_path
    if getattr(setup, "needs_model", False):
        args, names = setup(t, request.getfixturevalue("model_folder"))
    elif getattr(setup, "needs_checkpoint", False):
        args, names = setup(t, request.getfixturevalue("checkpoint_run"))
    else:
        args, names = setup(t)
    args = as_command(args, command)
    with getattr(setup, "fault", lambda t: contextlib.nullcontext())(t):
        out = xtune_here(*args)
    said = out.stdout + out.stderr
    assert "Traceback" not in said, said[-4000:]
    # CheckpointError exits 1 today (errors.py; the checkpoint work owns it): the table follows it.
    expected = 2  # a damaged checkpoint is bad input too (CheckpointError); only a failed save exits 1
    assert out.returncode == expected, said[-3000:]
    message = " ".join(out.stderr.split())
    for frag in fragments:
        assert frag.format(t=t, **names) in message, (frag.format(t=t, **names), out.stderr[-3000:])
    assert "error:" in out.stderr
    if getattr(setup, "fault", None):  # the half-written cache entry is gone: the next run starts clean
        assert not [p for p in (t / "cache").rglob("*") if ".tmp-" in p.name]


# -- the same errors on 2 ranks: `xtune sft` starts torchrun; the message is printed exactly once -------------
# One error found while preparing data (before any model is built), one while loading weights (every rank).
TWO_RANK_ROWS = ["not_utf8", "safetensors_truncated"]


@pytest.fixture(scope="module")
def two_rank_runs(request, tmp_path_factory):
    rows = {r[0]: r for r in ROWS}
    jobs, seen = {}, {}
    for name in TWO_RANK_ROWS:
        _, setup, fragments = rows[name]
        t = tmp_path_factory.mktemp(name)
        args, names = setup(t, request.getfixturevalue("model_folder")) if getattr(setup, "needs_model", False) \
            else setup(t)
        jobs[name] = [*args, "parallel.nproc_per_node=2"]
        seen[name] = [f.format(t=t, **names) for f in fragments]
    return seen, run_all(jobs)


@pytest.mark.parametrize("name", TWO_RANK_ROWS)
def test_bad_input_on_two_ranks_is_reported_once(two_rank_runs, name):
    fragments, runs = two_rank_runs
    out = runs[name]
    said = out.stdout + out.stderr
    assert out.returncode == 2, said[-3000:]
    assert "Traceback" not in said and "ChildFailedError" not in said, said[-4000:]
    assert "failed (exitcode" not in said, said[-4000:]  # torchrun's own report of the worker
    message = " ".join(out.stderr.split())
    assert message.count(fragments[name][0]) == 1, (fragments[name][0], out.stderr[-3000:])
    assert all(frag in message for frag in fragments[name]), out.stderr[-3000:]
    assert out.stderr.count("error:") == 1, out.stderr[-3000:]


# -- on_error=skip: bad records are skipped, counted by kind, in the run's summary and in `xtune data inspect` --
def skip_data(t):
    img = t / ("bad" + IMAGE.suffix)
    img.write_text("not an image\n")
    return write_lines(t / "mixed.jsonl", GOOD[:3] + [
        b'{"messages": [{"role": "user", "content": "\xff"}]}',                       # encoding
        '{"messages": [',                                                            # json
        chat(image_part("https://example.com/x.png")),                               # image (URL)
        image_msg(1, img),                                                           # image (not an image)
        chat({"type": "video", "video": "a.mp4"}),                                   # unsupported part
        {"messages": [text("robot", "x")]},                                          # record
    ] + GOOD[3:8])


KINDS = "6 bad record(s) skipped (data.on_error=skip): 2 image, 1 encoding, 1 json, 1 record, 1 unsupported part"


def test_on_error_skip_counts_skipped_records_by_kind(tmp_path):
    f = skip_data(tmp_path)
    out = xtune_here(*quick_run(tmp_path, f"data.datasets=[{{name:x,path:{f}}}]", "data.on_error=skip"))
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-3000:]
    assert f"x: {KINDS}" in said, said[-3000:]
    assert f"{f}:4: not UTF-8: byte 0xff at byte offset" in said

    out = xtune_here("data", "inspect", *quick_run(tmp_path, f"data.datasets=[{{name:x,path:{f}}}]",
                                                   "data.on_error=skip")[1:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"skipped {KINDS.replace(' skipped', '')}" in " ".join(out.stdout.split()), out.stdout[-3000:]


def test_data_inspect_without_a_terminal_marks_trained_spans(tmp_path):
    """Captured output is not a terminal: the trained spans are written between « and », and they are exactly
    the assistant answers (the labels, decoded independently of the renderer)."""
    f = write_lines(tmp_path / "one.jsonl", [{"messages": [text("user", "Say hi."), text("assistant", "Hi there!")]}])
    out = xtune_here("data", "inspect", *quick_run(tmp_path, f"data.datasets=[{{name:x,path:{f}}}]")[1:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trained «between these»" in out.stdout
    marked = out.stdout[out.stdout.index("between these"):]
    spans = [s.split("»")[0] for s in marked.split("«")[1:]]
    assert spans and spans[-1].startswith("<think>") and "Hi there!<|im_end|>" in spans[-1], marked
    assert "Say hi." not in "".join(spans)
