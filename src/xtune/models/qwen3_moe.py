"""Qwen3 MoE (Qwen3MoeForCausalLM).

transformers 5 stores each layer's experts fused: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows
first, then up) and `mlp.experts.down_proj` [E, H, I]. Original checkpoints (Qwen3-30B-A3B) keep one
module per expert: `mlp.experts.{e}.{gate,up,down}_proj.weight`. The two maps below convert between
them; everything else (attention, router `mlp.gate.weight`, norms) has the same name in both.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from ..errors import XtuneError
from .base import KeyStream, ModelAdapter

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


class Qwen3MoeAdapter(ModelAdapter):
    family = "qwen3_moe"
    auto_class = "AutoModelForCausalLM"
    model_cls = Qwen3MoeForCausalLM
    config_cls = Qwen3MoeConfig

    def to_model_keys(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        stream = self.key_stream(list(sd))
        out: Dict[str, torch.Tensor] = {}
        for key, tensor in sd.items():
            out.update(stream.push(key, tensor))
        stream.close()
        return out

    def key_stream(self, original_keys: List[str]) -> KeyStream:
        return _ExpertFuser(original_keys)

    def to_original_keys(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for key, tensor in sd.items():
            m = _FUSED.match(key)
            if m is None:
                out[key] = tensor
            elif m["proj"] == "down_proj":
                for e in range(tensor.shape[0]):
                    out[f"{m['prefix']}.{e}.down_proj.weight"] = tensor[e]
            else:
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    out[f"{m['prefix']}.{e}.gate_proj.weight"] = gate[e]
                    out[f"{m['prefix']}.{e}.up_proj.weight"] = up[e]
        return out

    def _extra_forward(self, model, batch):
        return {"output_router_logits": True}, []

    def _aux_loss(self, model, outputs) -> Optional[torch.Tensor]:
        """Load-balancing loss over the packed tokens, already multiplied by the coefficient: transformers'
        `load_balancing_loss_func` on the router logits of the decoder's output, as Qwen3MoeForCausalLM
        computes it (no padding mask: every token of a packed row is real)."""
        from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

        coef = self.spec.router_aux_loss_coef
        if coef is None:
            coef = model.config.router_aux_loss_coef
        if not outputs.router_logits or not coef:
            return None
        aux = load_balancing_loss_func(outputs.router_logits, model.config.num_experts,
                                       model.config.num_experts_per_tok, None)
        return coef * aux.float()


class _ExpertFuser(KeyStream):
    """Per-expert tensors are copied into the layer's fused buffers as they arrive (and freed); a layer's
    two fused tensors are handed out once all its experts are in. Peak: the layers in progress, not a
    second copy of the checkpoint."""

    def __init__(self, original_keys: List[str]):
        seen: Dict[str, Dict[str, set]] = {}
        for key in original_keys:
            m = _PER_EXPERT.match(key)
            if m is not None:
                seen.setdefault(m["prefix"], {}).setdefault(m["proj"], set()).add(int(m["e"]))
        self.n: Dict[str, int] = {}
        self.left: Dict[str, int] = {}
        for prefix, projs in seen.items():
            n = len(projs.get("down_proj", ()))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if projs.get(proj, set()) != set(range(n)):
                    raise XtuneError(f"checkpoint has an incomplete set of {prefix}.*.{proj} experts")
            self.n[prefix], self.left[prefix] = n, 3 * n
        self.buffers: Dict[str, Dict[str, torch.Tensor]] = {}

    def push(self, key: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
        m = _PER_EXPERT.match(key)
        if m is None:
            return {key: tensor}
        prefix, proj, e = m["prefix"], m["proj"], int(m["e"])
        n, buf = self.n[prefix], self.buffers.setdefault(prefix, {})
        if proj == "down_proj":
            buf.setdefault("down", tensor.new_empty((n, *tensor.shape)))[e].copy_(tensor)
        else:  # gate rows first, then up: [E, 2I, H]
            rows = tensor.shape[0]
            fused = buf.setdefault("gate_up", tensor.new_empty((n, 2 * rows, tensor.shape[1])))
            start = 0 if proj == "gate_proj" else rows
            fused[e, start:start + rows].copy_(tensor)
        self.left[prefix] -= 1
        if self.left[prefix]:
            return {}
        done = self.buffers.pop(prefix)
        return {f"{prefix}.gate_up_proj": done["gate_up"], f"{prefix}.down_proj": done["down"]}

    def close(self) -> None:
        if self.buffers:
            raise XtuneError(f"checkpoint has incomplete experts for {', '.join(sorted(self.buffers))}")
