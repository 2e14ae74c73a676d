"""Model families behind one adapter interface (see base.ModelAdapter and docs/CONTRACTS.md)."""

from xtune.models.registry import FAMILIES, get_adapter

__all__ = ["FAMILIES", "get_adapter"]
