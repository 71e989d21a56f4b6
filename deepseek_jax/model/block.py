"""One pre-norm decoder block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN dense or MoE."""

from __future__ import annotations

import jax
import flax.linen as nn

from deepseek_jax.model.attention import MLA
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.kv_cache import KVCache
from deepseek_jax.model.layers import RMSNorm, SwiGLU
from deepseek_jax.model.moe import MoE


_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def remat_block(cfg: ModelConfig):
  """Block, or Block rematerialised with cfg.remat_policy when cfg.remat (the blocks of a
  flax scan and the MTP blocks alike)."""
  if not cfg.remat:
    return Block
  # prevent_cse=False: inside a scan XLA cannot merge the recomputation away anyway, and
  # the CSE barriers only cost (the flax/JAX advice for scanned remat).
  return nn.remat(Block, policy=remat_policy(cfg), prevent_cse=not cfg.scan_layers)


def remat_policy(cfg: ModelConfig):
  """cfg.remat_policy's jax.checkpoint policy, also saving the routed experts' values
  that cfg.remat_save_experts names."""
  policy = _POLICIES[cfg.remat_policy]
  names = [n for n in cfg.remat_save_experts.split(",") if n]
  if names:
    policy = jax.checkpoint_policies.save_from_both_policies(
        policy, jax.checkpoint_policies.save_only_these_names(*names))
  return policy


class Block(nn.Module):
  cfg: ModelConfig
  moe: bool

  # setup (not compact) so that the training forward and the cached decode share the
  # submodules; the attribute names are the parameter names.
  def setup(self):
    cfg = self.cfg
    self.attn_norm = RMSNorm(cfg)
    self.attn = MLA(cfg)
    self.ffn_norm = RMSNorm(cfg)
    if self.moe:
      self.moe_ffn = MoE(cfg, name="moe")
    else:
      self.ffn = SwiGLU(cfg, cfg.ffn_dim)

  def _ffn(self, x_BTD, valid_BT, bias_E):
    h_BTD = self.ffn_norm(x_BTD)
    if self.moe:
      y_BTD, stats = self.moe_ffn(h_BTD, bias_E, valid_BT)
    else:
      y_BTD, stats = self.ffn(h_BTD), None
    return x_BTD + y_BTD, stats

  def __call__(self, x_BTD, pos_BT, segment_ids_BT, valid_BT, bias_E):
    """Returns (x_BTD, MoEStats or None)."""
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), pos_BT, segment_ids_BT)
    return self._ffn(x_BTD, valid_BT, bias_E)

  def decode(self, x_BTD, cache: KVCache, layer: int, n_new_B, valid_BT, bias_E,
             absorb: bool = True):
    """The block on a chunk against the KV cache (attention.MLA.decode).

    Returns (x_BTD, cache, MoEStats or None). The MoE layer is called as in training:
    the balancing bias picks the experts, padding (valid_BT False) is routed nowhere.
    """
    a_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), cache, layer, n_new_B, absorb)
    x_BTD, stats = self._ffn(x_BTD + a_BTD, valid_BT, bias_E)
    return x_BTD, cache, stats
