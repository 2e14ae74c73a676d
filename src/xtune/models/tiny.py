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
# The `auto` family's tiny models: one per supported model type, with the model_type that picks the
# transformers classes. Sliding windows are 6 tokens (shorter than the test documents) so packing tests
# see them; Llama and Gemma 3 tie their embeddings like the small real ones.
_AUTO_COMMON = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
AUTO_TINY = {
    "llama": dict(_AUTO_COMMON, model_type="llama", head_dim=16, tie_word_embeddings=True),
    "mistral": dict(_AUTO_COMMON, model_type="mistral", head_dim=16, sliding_window=6, tie_word_embeddings=False),
    "gemma3_text": dict(_AUTO_COMMON, model_type="gemma3_text", head_dim=16, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    "phi3": dict(_AUTO_COMMON, model_type="phi3", sliding_window=6, tie_word_embeddings=False,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "qwen2": dict(_AUTO_COMMON, model_type="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1,
                  tie_word_embeddings=False),
    "qwen3": dict(QWEN3_TINY, model_type="qwen3"),
}
