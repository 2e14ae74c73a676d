"""The tiny vision-language run as a user types it, on the bundled real images, 2 ranks on CPU:

    xtune sft recipe=intern_s1_mini model=intern_s1_tiny parallel=cpu2 <small overrides>

It must exit 0 with finite losses; the recipe freezes the vision tower and the projector, so they are
unchanged in the export (and have no optimizer state) while the language model moved; the export
(random init: transformers' native InternVL layout) loads with AutoModelForImageTextToText and gives
the trained checkpoint's logits. A second run mixes a text-only and an image dataset so that one
rank's micro-batch has an image while the other's has none (and a step where neither has one): it
must finish, not hang (the subprocess has a timeout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.integration.test_model_families import safetensors_of, train_records, xtune_sft

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "xtune" / "assets" / "demo"
FROZEN = ("model.vision_tower.", "model.multi_modal_projector.")
LANGUAGE = ("model.language_model.", "lm_head.")

VL = ["recipe=intern_s1_mini", "model=intern_s1_tiny", "parallel=cpu2"]
SMALL = ["train.epochs=null", "data.pack_max_length=1024", "data.sample_max_length=1024", "data.num_workers=1",
         "train.global_batch_size=2", "train.log_every=1", "logging.tensorboard=false"]


def checkpoint_tensors(ckpt: Path, model_keys) -> dict:
    """Model weights of a DCP checkpoint (torch's reader, shaped like `model_keys`; no xtune code)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    sd = {"model": {k: torch.empty_like(v) for k, v in model_keys.items()}}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(ckpt))
    return sd["model"]


def optimizer_params(ckpt: Path) -> set:
    """Parameter names that have AdamW state in a DCP checkpoint (from its metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    names = set()
    for key in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata:
        if key.startswith("optim.state.") and key.endswith(".exp_avg"):
            names.add(key[len("optim.state."):-len(".exp_avg")])
    return names


# Slow: intern_s1 trains on 2 ranks and exports a drop-in in test_model_families.py, the intern_s1_mini recipe
# on 2 ranks in test_remote_tokenizer_run.py, frozen parts under FSDP2 in the split-invariance test.
@pytest.mark.slow
def test_intern_s1_mini_recipe_tiny_model_two_ranks(tmp_path):
    from transformers import AutoModelForImageTextToText

    run = tmp_path / "run"
    code, out = xtune_sft(VL + SMALL + ["train.max_steps=3", "train.save_every=1", "train.keep_last=3",
                                        f"data.cache_dir={tmp_path / 'cache'}"], run, timeout=120)
    assert code == 0, out[-5000:]
    recs = train_records(run)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and math.isfinite(r["grad_norm"]) for r in recs)
    config = (run / "config.yaml").read_text()
    assert "freeze_vision: true" in config and "freeze_projector: true" in config

    hf = run / "hf"
    exported = safetensors_of(hf)
    assert json.loads((hf / "config.json").read_text())["model_type"] == "internvl"
    model = AutoModelForImageTextToText.from_pretrained(str(hf)).eval()
    own = model.state_dict()
    assert sorted(own) == sorted(exported) and all(torch.equal(own[k], exported[k]) for k in own)

    # The frozen parts have no optimizer state; every language-model parameter has.
    final = run / "checkpoints" / "step-3"
    with_state = optimizer_params(final)
    assert with_state and not any(k.startswith(FROZEN) for k in with_state)
    assert {k for k in exported if k.startswith(LANGUAGE)} <= with_state

    # Weights: frozen ones equal after step 1 and at the end (the run starts from them), language ones moved.
    step1 = checkpoint_tensors(run / "checkpoints" / "step-1", own)
    frozen = [k for k in exported if k.startswith(FROZEN)]
    language = [k for k in exported if k.startswith(LANGUAGE)]
    assert len(frozen) > 10 and len(language) > 10
    changed_frozen = [k for k in frozen if not torch.equal(exported[k], step1[k])]
    assert not changed_frozen, f"frozen weights changed: {changed_frozen[:5]}"
    unchanged = [k for k in language if torch.equal(exported[k], step1[k])]
    assert not unchanged, f"language weights did not train: {unchanged[:5]}"

    # The export gives the final checkpoint's logits, on text with an image.
    trained = checkpoint_tensors(final, own)
    reference = AutoModelForImageTextToText.from_pretrained(str(hf)).eval()
    reference.load_state_dict(trained, strict=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 4000, (1, 20), generator=g)
    ids[0, 2:6] = model.config.image_token_id
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 56, 56, generator=g)}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)


def _records(path: Path, with_image: bool, n: int) -> list:
    out = []
    for line in (DEMO / "vl_train.jsonl").read_text().splitlines():
        has = '"image_url"' in line
        if has == with_image and (not has or line.count('"image_url"') == 2):  # one image at most
            out.append(line)
        if len(out) == n:
            break
    path.write_text("".join(line + "\n" for line in out))
    return out


def test_one_rank_with_image_the_other_without_does_not_hang(tmp_path):
    from xtune.config.io import spec_from_yaml
    from xtune.data import build_train_loader
    from xtune.models import get_adapter

    text, image = tmp_path / "text.jsonl", tmp_path / "image.jsonl"
    _records(text, False, 3)
    _records(image, True, 1)
    run = tmp_path / "run"
    # One sample per row (pack=none): 4 rows, 2 per step (one per rank); over 2 steps one step has
    # the image row on one rank only and the other step has no image at all.
    args = VL + SMALL + [
        "train.max_steps=2", "data.pack=none", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.datasets.0.path={text}", "data.datasets.0.sample_ratio=1.0",
        f"data.datasets.1.path={image}", "data.datasets.1.sample_ratio=1.0", f"data.datasets.1.media_root={DEMO}",
    ]
    code, out = xtune_sft(args, run, timeout=120)
    assert code == 0, out[-5000:]
    recs = train_records(run)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)

    # The run really had a step where exactly one rank's micro-batch carried the image.
    spec = spec_from_yaml(run / "config.yaml")
    tok = get_adapter(spec.model).load_tokenizer()
    loaders = [build_train_loader(spec, tok, dp_rank=r, dp_size=2, rank=1) for r in range(2)]
    ranks_with_image = [sum(any(mb.pixel_values is not None for mb in next(ld)) for ld in loaders) for _ in range(2)]
    assert sorted(ranks_with_image) == [0, 1], ranks_with_image
    assert (run / "hf" / "model.safetensors").is_file()
