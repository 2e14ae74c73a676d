"""Architecture dicts (`model.arch`) for the tiny CPU models and the real models.

Tiny models are the real architectures at small sizes: they train on a CPU in seconds and are what
the tests use. The real dicts are the published config.json values, so `conf/model/*.yaml` groups
compose and validate (and can be random-initialised for smoke tests) without downloading weights.
"""

from __future__ import annotations

QWEN3_TINY = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
    rope_theta=10000.0, tie_word_embeddings=False,
)

QWEN3_MOE_TINY = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
)

# 56 px tiles, 14 px patches -> 4x4 patches; pixel shuffle 0.5 -> 2x2 = 4 tokens per tile
# (model.image_size=56, model.tokens_per_tile=4). image_token_id comes from the tokenizer's <IMG_CONTEXT>.
INTERN_S1_TINY = dict(
    downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
    vision_feature_select_strategy="default",
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=[56, 56], patch_size=[14, 14], attention_bias=True),
    text_config=dict(model_type="qwen3", vocab_size=4096, hidden_size=128, intermediate_size=384,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
)

QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
)

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    router_aux_loss_coef=0.001, attention_bias=False, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645,
)

# InternViT-300M (448 px, patch 14) + 2-layer MLP projector + Qwen3-8B text with Intern-S1's 153,216 vocab.
INTERN_S1_MINI = dict(
    image_token_id=152957, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
    vision_feature_layer=-1, vision_feature_select_strategy="default",
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                       norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1,
                       hidden_act="gelu", use_mean_pooling=True),
    text_config=dict(model_type="qwen3", vocab_size=153216, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, attention_bias=False, tie_word_embeddings=False),
)

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

ARCHS = {
    "qwen3_tiny": QWEN3_TINY, "qwen3_moe_tiny": QWEN3_MOE_TINY, "intern_s1_tiny": INTERN_S1_TINY,
    "qwen3_8b": QWEN3_8B, "qwen3_30b_a3b": QWEN3_30B_A3B, "intern_s1_mini": INTERN_S1_MINI,
}
