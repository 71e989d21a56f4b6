"""Hugging Face DeepSeek-V3 config.json <-> ModelConfig (SPEC.md section 7): what the model
cannot do raises ValueError with the field named."""

from __future__ import annotations

from typing import Any, Mapping

from absl import logging

from deepseek_jax.model.config import ModelConfig, yarn_mscale


def _require(ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"unsupported Hugging Face config: {what}")


def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """rope_parameters (v5) or rope_scaling + rope_theta (v4 / released) -> our rope fields."""
  rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  _require(not any(isinstance(v, Mapping) for v in rp.values()),
           "per-layer-type rope_parameters")
  kind = rp.get("rope_type", rp.get("type", "default"))
  theta = float(rp.get("rope_theta") or hf.get("rope_theta") or 10000.0)
  _require(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor")) in (None, 1, 1.0),
           "partial_rotary_factor != 1")
  max_pos = hf.get("max_position_embeddings", 4096)
  if kind == "default":
    return dict(rope_theta=theta, rope_original_max_len=int(max_pos))
  _require(kind == "yarn", f"rope type {kind!r} (only 'default' and 'yarn')")
  _require(rp.get("truncate", True), "yarn with truncate=False")
  orig = (rp.get("original_max_position_embeddings")
          or hf.get("original_max_position_embeddings") or max_pos)
  # HF derives the factor from the two lengths when it is missing.
  factor = float(rp.get("factor") or max_pos / orig)
  # A missing mscale / mscale_all_dim reads as 0, which is how HF treats it: no ratio in
  # the cos/sin factor, no mscale^2 on the softmax scale (layers.py tests truthiness).
  mscale, mscale_all = float(rp.get("mscale") or 0.0), float(rp.get("mscale_all_dim") or 0.0)
  if rp.get("attention_factor") is not None:
    ours = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            if mscale and mscale_all else yarn_mscale(factor, 1.0))
    _require(abs(rp["attention_factor"] - ours) < 1e-6,
             f"yarn attention_factor={rp['attention_factor']} != {ours} implied by mscales")
  return dict(rope_theta=theta, rope_factor=factor, rope_original_max_len=int(orig),
              beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
              mscale=mscale, mscale_all_dim=mscale_all)


# HF's class defaults for these are V3's sizes: better a clear error than a silent 2.5.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
             "num_hidden_layers", "num_attention_heads", "n_shared_experts",
             "n_routed_experts", "routed_scaling_factor", "n_group", "topk_group",
             "num_experts_per_tok", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank",
             "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """A HF config.json dict -> ModelConfig; what the model cannot do raises ValueError."""
  absent = [k for k in _REQUIRED if k not in hf]
  if absent:
    raise ValueError(f"Hugging Face config lacks {absent}")
  _require(not hf.get("attention_bias", False), "attention_bias=True")
  _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}")
  _require("quantization_config" not in hf,
           "quantized weights (e.g. FP8 with weight_scale_inv): dequantize first")
  _require(hf.get("moe_layer_freq", 1) == 1, "moe_layer_freq != 1")
  _require(hf.get("topk_method", "noaux_tc") == "noaux_tc",
           f"topk_method={hf.get('topk_method')!r} (only noaux_tc)")
  n_layers = hf["num_hidden_layers"]
  mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
      n_heads=hf["num_attention_heads"], q_lora_rank=hf["q_lora_rank"],
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      ffn_dim=hf["intermediate_size"], moe_ffn_dim=hf["moe_intermediate_size"],
      first_k_dense=min(hf.get("first_k_dense_replace") or 0, n_layers),
      n_shared_experts=hf.get("n_shared_experts") or 0,
      n_routed_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
      n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
      routed_scaling_factor=float(hf["routed_scaling_factor"]),
      score_func=hf.get("scoring_func", "sigmoid"),
      norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)), mtp_depth=mtp or 0,
      # Released MTP weights are driven by the normed hidden state (HF, vLLM).
      mtp_feed_normed=True,
      init_std=float(hf.get("initializer_range", 0.006)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_from_hf(hf))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The inverse of config_from_hf (runtime fields such as moe_dispatch are not saved)."""
  if cfg.bias_mode != "add":
    raise ValueError(f"ModelConfig.bias_mode={cfg.bias_mode!r}: Hugging Face's "
                     "e_score_correction_bias is additive; only bias_mode='add' exports")
  if cfg.mtp_depth and not cfg.mtp_feed_normed:
    logging.warning("exporting MTP weights trained on the pre-norm hidden state "
                    "(mtp_feed_normed=False); HF and vLLM feed MTP the normed one")
  if cfg.yarn:
    rope = dict(rope_type="yarn", rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
                beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                mscale_all_dim=cfg.mscale_all_dim)
    max_pos = int(round(cfg.rope_original_max_len * cfg.rope_factor))
  else:
    rope, max_pos = dict(rope_type="default", rope_theta=cfg.rope_theta), cfg.rope_original_max_len
  return dict(
      architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
      moe_intermediate_size=cfg.moe_ffn_dim, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      # MLA has no kv-head grouping; HF's eager attention divides heads by this.
      num_key_value_heads=cfg.n_heads,
      n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
      routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
      topk_group=cfg.topk_group, num_experts_per_tok=cfg.top_k,
      first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=cfg.norm_topk_prob,
      scoring_func=cfg.score_func, topk_method="noaux_tc", kv_lora_rank=cfg.kv_lora_rank,
      q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
      qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, hidden_act="silu",
      attention_bias=False, rms_norm_eps=cfg.rms_eps, rope_parameters=rope,
      rope_interleave=True, max_position_embeddings=max_pos,
      tie_word_embeddings=cfg.tie_embeddings, num_nextn_predict_layers=cfg.mtp_depth,
      initializer_range=cfg.init_std, dtype=cfg.param_dtype)
