"""deepseek_jax.hf's config mapping (no torch needed): what HF configs import as, which
are refused by name, and round trips of our presets; the released V3 config.json is the
V3 preset. The weights and logits against transformers are tests/test_hf.py."""

import pytest

from deepseek_jax import hf
from deepseek_jax.model import config

BASE = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=2, n_shared_experts=1, n_routed_experts=8,
    n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=12,
    routed_scaling_factor=2.5, max_position_embeddings=64, num_mtp_layers=0)


@pytest.mark.parametrize("change, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0)), "rope type 'linear'"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=2.0, truncate=False)), "truncate"),
    (dict(quantization_config=dict(quant_method="fp8")), "quantized"),
    (dict(topk_method="greedy"), "topk_method"),
])
def test_unsupported_config_raises(change, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf({**BASE, **change})


def test_missing_config_field_raises():
  with pytest.raises(ValueError, match="lacks.*routed_scaling_factor"):
    hf.config_from_hf({k: v for k, v in BASE.items() if k != "routed_scaling_factor"})


# Configs ----------------------------------------------------------------------------

# The released DeepSeek-V3 config.json (v4 layout: rope_scaling + rope_theta), less its
# quantization_config and auto_map.
RELEASED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0,
    "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280}


def test_released_v3_config_is_the_preset():
  want = config.deepseek_v3_671b().replace(init_std=0.02, dtype="float32",
                                           mtp_feed_normed=True)
  assert hf.config_from_hf(RELEASED_V3) == want


def test_yarn_factor_defaults_to_length_ratio():
  rope = dict(rope_type="yarn", original_max_position_embeddings=8)
  cfg = hf.config_from_hf({**BASE, "max_position_embeddings": 40, "rope_parameters": rope})
  assert cfg.rope_factor == 5.0 and cfg.mscale == cfg.mscale_all_dim == 0.0


@pytest.mark.parametrize("name", ["tiny", "tiny_yarn", "deepseek_v3_671b", "deepseek_v2_lite"])
def test_config_roundtrip(name):
  cfg = config.preset(name, dtype="float32", param_dtype="float32")
  # HF's config cannot say which MTP input convention a model uses: imports take HF's.
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg.replace(mtp_feed_normed=True)
