"""Preference pairs with images, for Intern-S1 (as in SFT): a pair whose prompt holds a real image becomes two
documents of one row, each with its own copy of the image's tokens (untrained) and tiles; the packed per-document
log-probs equal each half run alone through the plain transformers model with its pixel values, so both halves
see the image features; and the DPO loss at the first step is ln 2."""

import dataclasses
import math
from pathlib import Path

import torch

from xtune.data.loader import PackedData
from xtune.data.types import IGNORE_INDEX
from xtune.methods.preference import PrefLossModel
from xtune.models import get_adapter
from xtune.models.tiny import INTERN_S1_TINY

IMAGE = Path(__file__).resolve().parents[2] / "src" / "xtune" / "assets" / "demo" / "images" / "shape_003.png"
MODEL = dict(family="intern_s1", tokenizer="builtin:intern_s1_tiny", arch=INTERN_S1_TINY, image_size=56,
             tokens_per_tile=4)


def _half_logp(model, ids, labels, pixel_values):
    """Sum of label log-probs of one document alone: transformers' forward, torch's log_softmax."""
    logits = model(input_ids=ids[None], pixel_values=pixel_values, use_cache=False).logits[0].float()
    mask = labels != IGNORE_INDEX
    return torch.log_softmax(logits, -1)[mask].gather(1, labels[mask][:, None]).sum()


def test_pair_with_an_image_trains_both_halves_on_the_image(run_spec, write_jsonl, intern_tok):
    prompt = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(IMAGE)}},
                                           {"type": "text", "text": "What shape is this?"}]}]
    path = write_jsonl("pairs.jsonl", [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "A red triangle."}],
         "rejected": [{"role": "assistant", "content": "A blue square, I think."}]},
        {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi!"}],
         "rejected": [{"role": "assistant", "content": "No."}]},
    ])
    spec = dataclasses.replace(run_spec([("pref", path)], model=MODEL, sample_max_length=512, pack_max_length=1024),
                               method="dpo")
    data = PackedData(spec.data.datasets, spec, intern_tok, shuffle=False, verbose=False)
    assert len(data.rows) == 1
    batch = data.batch([0])
    adapter = get_adapter(spec.model)
    torch.manual_seed(0)
    model = adapter.build_model(adapter.build_config(), "sdpa")
    image_id = model.config.image_token_id

    # Both halves of the image pair carry the image's tokens, untrained, and one copy of its tiles each.
    cu = batch.cu_seqlens.tolist()
    ids, labels = batch.input_ids[0], batch.labels[0]
    pair = batch.pair_docs[batch.pair_ids.tolist().index(0)].tolist()
    image_tokens = [int((ids[cu[d]:cu[d + 1]] == image_id).sum()) for d in range(len(cu) - 1)]
    assert image_tokens[pair[0]] == image_tokens[pair[1]] > 0 and sum(image_tokens) == 2 * image_tokens[pair[0]]
    assert (labels[ids == image_id] == IGNORE_INDEX).all()
    assert (labels[:-1][ids[1:] == image_id] == IGNORE_INDEX).all()  # no image token is a target either
    tiles = batch.pixel_values.shape[0] // 2
    assert tiles * 4 == image_tokens[pair[0]]
    assert torch.equal(batch.pixel_values[:tiles], batch.pixel_values[tiles:])

    root = PrefLossModel(model, adapter, "sdpa", spec, "chunk")
    packed = root.doc_logprobs(batch)
    with torch.no_grad():
        for d in range(len(cu) - 1):
            pv = batch.pixel_values[:tiles] if image_tokens[d] else None
            alone = _half_logp(model, ids[cu[d]:cu[d + 1]], labels[cu[d]:cu[d + 1]], pv)
            assert abs(packed[d].item() - alone.item()) <= 1e-4 * abs(alone.item()), d
            if image_tokens[d]:  # the image matters: another image gives another log-prob
                other = _half_logp(model, ids[cu[d]:cu[d + 1]], labels[cu[d]:cu[d + 1]], torch.zeros_like(pv))
                assert abs(other.item() - alone.item()) > 1e-3

    # Step 1 of DPO: the reference is the policy, so every pair's loss is ln 2; the gradient reaches the vision tower.
    reference = packed.detach()[batch.pair_docs].double()
    loss, _, _ = root(batch, reference)
    assert math.isclose(loss.item() / batch.num_pairs, math.log(2), rel_tol=1e-6)
    loss.backward()
    vision = [p.grad for n, p in model.named_parameters() if n.startswith("model.vision_tower")]
    assert any(g is not None and g.abs().max() > 0 for g in vision)
