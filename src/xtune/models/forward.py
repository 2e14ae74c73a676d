"""The forward the loss needs: the final hidden states (after the last norm, before the output projection).

`HiddenStates` is one part of `ModelAdapter` (models/base.py); a family adds its inputs (pixel values, the
router logits) and its auxiliary loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xtune.ops.attention import packed_kwargs


class HiddenStates:
    def _forward_kwargs(self, model, batch, attn_impl) -> dict[str, Any]:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        return packed_kwargs(batch, attn_impl, dtype=dtype)

    def _extra_forward(self, model, batch) -> tuple[dict[str, Any], list]:
        """Family-specific forward kwargs and temporary hooks (removed after the forward)."""
        return {}, []

    def _aux_loss(self, model, outputs, share=None) -> torch.Tensor | None:
        """The auxiliary loss of the forward, or None. `share` (engine/ulysses.RowShare): the forward ran one
        piece of a row under sequence parallelism; the loss is then this rank's part of the row's."""
        return None

    def hidden_states(self, model: nn.Module, batch, attn_impl: str,
                      share=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states [T, H] and the aux loss or None (`share`: see `_aux_loss`).

        The model's body (`base_model`: the decoder, or a VLM's model that merges the image features before
        its decoder) runs without the output projection; the loss module applies that chunk by chunk. Under
        FSDP2 this runs inside the root's (the loss module's) forward, which has unsharded the embeddings,
        the final norm and the output projection.
        """
        kwargs = self._forward_kwargs(model, batch, attn_impl)
        extra, hooks = self._extra_forward(model, batch)
        try:
            outputs = model.base_model(input_ids=batch.input_ids, **kwargs, **extra)
        finally:
            for h in hooks:
                h.remove()
        hidden = outputs.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]), self._aux_loss(model, outputs, share)
