"""Qwen3 MoE (Qwen3MoeForCausalLM).

transformers 5 stores each layer's experts fused: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows
first, then up) and `mlp.experts.down_proj` [E, H, I]. Original checkpoints (Qwen3-30B-A3B) keep one
module per expert: `mlp.experts.{e}.{gate,up,down}_proj.weight`. The two maps below convert between
them; everything else (attention, router `mlp.gate.weight`, norms) has the same name in both.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from xtune.errors import XtuneError
from xtune.models.base import KeyStream, ModelAdapter

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


class Qwen3MoeAdapter(ModelAdapter):
    family = "qwen3_moe"
    auto_class = "AutoModelForCausalLM"
    model_cls = Qwen3MoeForCausalLM
    config_cls = Qwen3MoeConfig

    def to_model_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stream = self.key_stream(list(sd))
        out: dict[str, torch.Tensor] = {}
        for key, tensor in sd.items():
            out.update(stream.push(key, tensor))
        stream.close()
        return out

    def key_stream(self, original_keys: list[str]) -> KeyStream:
        return _ExpertFuser(original_keys)

    def to_original_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
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

    def _aux_loss(self, model, outputs, share=None) -> torch.Tensor | None:
        """Load-balancing loss over the packed tokens, already multiplied by the coefficient: transformers'
        `load_balancing_loss_func` on the router logits of the decoder's output, as Qwen3MoeForCausalLM
        computes it (no padding mask: every token of a packed row is real). Under sequence parallelism
        (`share`) this rank's part of the row's loss (`_row_balance_part`)."""
        coef = self.spec.router_aux_loss_coef
        if coef is None:
            coef = model.config.router_aux_loss_coef
        if not outputs.router_logits or not coef:
            return None
        cfg = model.config
        if share is None:
            aux = load_balancing_loss_func(outputs.router_logits, cfg.num_experts, cfg.num_experts_per_tok, None)
        else:
            aux = _row_balance_part(outputs.router_logits, cfg.num_experts, cfg.num_experts_per_tok, share)
        return coef * aux.float()


def _row_balance_part(gate_logits, num_experts: int, top_k: int, share) -> torch.Tensor:
    """This rank's part of the load-balancing loss of a row cut over an SP group (the parts sum to the row's loss).

    transformers' loss (load_balancing_loss_func, transformers 5.24) is E * sum_e (C_e / N) * (S_e / N) over all
    layers' tokens: C_e the top-k assignments to expert e, S_e the sum of its router probabilities, N the tokens
    times layers. It is not a mean of per-piece losses: C and N are summed over the group (no gradient, as at
    sp=1, where C comes from a top-k), S stays this piece's. The padding at the row's end is left out.
    """
    counts = torch.zeros(num_experts, dtype=torch.float32, device=gate_logits[0].device)
    probs = torch.zeros_like(counts)
    for layer in gate_logits:
        weights = torch.nn.functional.softmax(layer[:share.real], dim=-1)
        _, chosen = torch.topk(weights, top_k, dim=-1)
        counts += torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        probs = probs + weights.float().sum(dim=0)
    stats = torch.cat([counts, counts.new_tensor([share.real * len(gate_logits)])])
    dist.all_reduce(stats, group=share.group)  # sum over the row's pieces
    total = stats[-1]
    return num_experts * torch.sum((stats[:num_experts] / total) * (probs / total))


class _ExpertFuser(KeyStream):
    """Per-expert tensors are copied into the layer's fused buffers as they arrive (and freed); a layer's
    two fused tensors are handed out once all its experts are in. Peak: the layers in progress, not a
    second copy of the checkpoint."""

    def __init__(self, original_keys: list[str]):
        seen: dict[str, dict[str, set]] = {}
        for key in original_keys:
            m = _PER_EXPERT.match(key)
            if m is not None:
                seen.setdefault(m["prefix"], {}).setdefault(m["proj"], set()).add(int(m["e"]))
        self.n: dict[str, int] = {}
        self.left: dict[str, int] = {}
        for prefix, projs in seen.items():
            n = len(projs.get("down_proj", ()))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if projs.get(proj, set()) != set(range(n)):
                    raise XtuneError(f"checkpoint has an incomplete set of {prefix}.*.{proj} experts")
            self.n[prefix], self.left[prefix] = n, 3 * n
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}

    def push(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
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
