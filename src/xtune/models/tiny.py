"""Architecture dicts of the tiny CPU models, read from their conf/model groups so the tests build exactly
the models a user gets with model=qwen3_tiny (one source, no second copy to drift)."""

from __future__ import annotations

from omegaconf import OmegaConf

from xtune.config.resources import conf_dir


def tiny_arch(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / f"{name}.yaml").arch)


QWEN3_TINY = tiny_arch("qwen3_tiny")
QWEN3_MOE_TINY = tiny_arch("qwen3_moe_tiny")
INTERN_S1_TINY = tiny_arch("intern_s1_tiny")
