"""Qwen3 MoE (Qwen3MoeForCausalLM).

transformers 5 stores each layer's experts fused: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows
first, then up) and `mlp.experts.down_proj` [E, H, I]. Original checkpoints (Qwen3-30B-A3B) keep one
module per expert: `mlp.experts.{e}.{gate,up,down}_proj.weight`. The two maps below convert between
them; everything else (attention, router `mlp.gate.weight`, norms) has the same name in both.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from ..errors import XtuneError
from .base import ModelAdapter

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


class Qwen3MoeAdapter(ModelAdapter):
    family = "qwen3_moe"
    auto_class = "AutoModelForCausalLM"
    model_cls = Qwen3MoeForCausalLM
    config_cls = Qwen3MoeConfig

    def to_model_keys(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        experts: Dict[str, Dict[str, Dict[int, torch.Tensor]]] = {}
        for key, tensor in sd.items():
            m = _PER_EXPERT.match(key)
            if m is None:
                out[key] = tensor
            else:
                experts.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["e"])] = tensor
        for prefix, projs in experts.items():
            n = len(projs.get("down_proj", {}))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if sorted(projs.get(proj, {})) != list(range(n)):
                    raise XtuneError(f"checkpoint has an incomplete set of {prefix}.*.{proj} experts")
            gate_up = [torch.cat([projs["gate_proj"][e], projs["up_proj"][e]], dim=0) for e in range(n)]
            out[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
            out[f"{prefix}.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(n)])
        return out

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
        """Load-balancing loss over the packed tokens (transformers' `load_balancing_loss_func`, computed
        by the model from its router logits), already multiplied by the coefficient."""
        coef = self.spec.router_aux_loss_coef
        if coef is None:
            coef = model.config.router_aux_loss_coef
        if outputs.aux_loss is None or not coef:
            return None
        return coef * outputs.aux_loss.float()
