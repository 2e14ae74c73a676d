"""Builds a tokenizer folder that behaves like Intern-S1-mini's: remote code, slow, no tokenizer.json.

`build_s1_tokenizer(folder)` writes, from the shipped tiny Intern-S1 BPE (`intern_s1_tiny/tokenizer.json`):
- vocab.json + merges.txt (the same byte-level BPE, so plain text gets the fast tokenizer's ids),
- tokenizer_SMILES.model: a sentencepiece model trained here on the SMILES strings below,
- tokenization_s1_fixture.py (tests/fixtures) and a tokenizer_config.json whose `auto_map` points at it,
  with the tiny tokenizer's added tokens and chat template plus `<SMILES>` / `</SMILES>`.
Used by the tests and by `bench/bench_data.py` (the slow-path tokens/s).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "xtune" / "assets" / "tokenizers" / "intern_s1_tiny"
MODULE = Path(__file__).resolve().parent / "fixtures" / "tokenization_s1_fixture.py"
MODULE_FILE = MODULE.name

# Common molecules (aspirin, caffeine, benzene, ...): the sentencepiece training text.
SMILES = [
    "CC(=O)OC1=CC=CC=C1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C1=CC=CC=C1", "CCO", "CC(C)CC1=CC=C(C=C1)C(C)C(=O)O",
    "C1=CC=C(C=C1)C=O", "CC1=CC=CC=C1C=O", "C(C1C(C(C(C(O1)O)O)O)O)O", "CC(=O)NC1=CC=C(C=C1)O", "O=C=O",
    "C1CCCCC1", "CC(C)O", "CCN(CC)CC", "C1=CC=C2C=CC=CC2=C1", "CC(=O)C", "ClC(Cl)Cl", "CS(=O)C", "C#N", "N#CC#N",
    "OC(=O)CC(O)(CC(O)=O)C(O)=O", "CC1=C(C=C(C=C1)N)N", "C1=CN=CC=C1", "C1=CC=C(C=C1)N", "CCCCCCCCCCCCCCCC(=O)O",
    "C=CC=C", "BrC1=CC=CC=C1", "FC(F)(F)C(=O)O", "CC(C)(C)O", "C1COCCO1", "NCC(=O)O", "CC(N)C(=O)O",
]
SMILES_VOCAB = 48


def _train_smiles_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SMILES * 4), model_writer=buf, vocab_size=SMILES_VOCAB, model_type="bpe",
        character_coverage=1.0, add_dummy_prefix=False, hard_vocab_limit=False, num_threads=1,
        minloglevel=2, bos_id=-1, eos_id=-1, unk_id=0,
    )
    return buf.getvalue()


def build_s1_tokenizer(folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tj = json.loads((TINY / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    (folder / "tokenizer_SMILES.model").write_bytes(_train_smiles_model())
    shutil.copyfile(MODULE, folder / MODULE_FILE)

    import sentencepiece as spm

    sp_size = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer_SMILES.model")).get_piece_size()
    added = {a["id"]: a for a in tj["added_tokens"]}
    offset = max(max(vocab.values()), max(added)) + 1  # SMILES pieces follow BPE + added tokens, as in Intern-S1
    for i, content in enumerate(("<SMILES>", "</SMILES>")):
        added[offset + sp_size + i] = {"content": content, "special": False}
    cfg = json.loads((TINY / "tokenizer_config.json").read_text())
    config = {
        "tokenizer_class": "S1FixtureTokenizer",
        "auto_map": {"AutoTokenizer": [f"{MODULE.stem}.S1FixtureTokenizer", None]},
        "smiles_offset": offset,
        "added_tokens_decoder": {
            str(i): {"content": a["content"], "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": bool(a.get("special", True))}
            for i, a in sorted(added.items())
        },
        **{k: cfg[k] for k in ("chat_template", "eos_token", "pad_token", "model_max_length", "clean_up_tokenization_spaces",
                               "context_image_token", "start_image_token", "end_image_token") if k in cfg},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    return folder
