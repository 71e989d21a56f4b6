"""One pre-norm decoder block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN dense or MoE."""

from __future__ import annotations

import flax.linen as nn

from deepseek_jax.attention import MLA
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import RMSNorm, SwiGLU
from deepseek_jax.moe import MoE


class Block(nn.Module):
  cfg: ModelConfig
  moe: bool

  @nn.compact
  def __call__(self, x_BTD, pos_BT, segment_ids_BT, valid_BT, bias_E):
    """Returns (x_BTD, MoEStats or None)."""
    cfg = self.cfg
    x_BTD = x_BTD + MLA(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x_BTD), pos_BT,
                                          segment_ids_BT)
    h_BTD = RMSNorm(cfg, name="ffn_norm")(x_BTD)
    if self.moe:
      y_BTD, stats = MoE(cfg, name="moe")(h_BTD, bias_E, valid_BT)
    else:
      y_BTD, stats = SwiGLU(cfg, cfg.ffn_dim, name="ffn")(h_BTD), None
    return x_BTD + y_BTD, stats
