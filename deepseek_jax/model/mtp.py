"""Multi-Token Prediction modules (V3 eqs 21-25).

Module k (1..D) predicts token i+k+1 at position i from
  h'_k[i] = W_k [RMSNorm(Emb(t[i+k])) ; RMSNorm(h_{k-1}[i])]     (embedding FIRST, as the
  h_k     = TRM_k(h'_k)                                          released checkpoints)
  logits  = Head(RMSNorm_k(h_k))
with h_0 the main model's last hidden state BEFORE its final norm (cfg.mtp_feed_normed
switches to the released weights' convention, h_0 after it as HF and vLLM feed it, each
module then passing on its normed output as HF does; vLLM passes the un-normed one). Emb and Head are the
main model's arrays, passed in by the caller, never copied.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from deepseek_jax.model.block import remat_block
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import RMSNorm, linear, param
from deepseek_jax.model.partitioning import CONTEXT, axis_size, constrain


def shift_left(x_BT, k, fill=0):
  """x[:, i+k] at position i; the last k positions get `fill`."""
  if k == 0:
    return x_BT
  pad = jnp.full((x_BT.shape[0], k) + x_BT.shape[2:], fill, x_BT.dtype)
  return jnp.concatenate([x_BT[:, k:], pad], axis=1)


class MTPModule(nn.Module):
  cfg: ModelConfig

  # setup (not compact): the training forward and the cached decode share the weights.
  def setup(self):
    cfg = self.cfg
    self.enorm = RMSNorm(cfg)
    self.hnorm = RMSNorm(cfg)
    self.w_proj = param(self, "w_proj", (2 * cfg.d_model, cfg.d_model),
                        ("mtp_concat", "embed"), cfg)
    self.block = remat_block(cfg)(cfg, moe=cfg.mtp_is_moe)
    self.final_norm = RMSNorm(cfg)

  def _input(self, h_prev_BTD, emb_next_BTD):
    dt = self.cfg.jnp_dtype
    e_BTD = self.enorm(emb_next_BTD)
    h_BTD = self.hnorm(h_prev_BTD)
    if axis_size(CONTEXT) > 1:
      # Both halves pinned like the residual stream before the concatenation (left
      # free, the whole sequence's [1, 131072, 2 D] was gathered at 128K).
      e_BTD = constrain(e_BTD, ("batch", "length", None))
      h_BTD = constrain(h_BTD, ("batch", "length", None))
    x_BTD = linear(jnp.concatenate([e_BTD, h_BTD], -1).astype(dt), self.w_proj.astype(dt))
    # Split like the residual stream (the shifted tokens it embeds come unsplit).
    return constrain(x_BTD, ("batch", "length", None))

  def __call__(self, h_prev_BTD, emb_next_BTD, pos_BT, segment_ids_BT, valid_BT, bias_E):
    """Returns (h_k [B,T,D] before the final norm, normed h_k for the head, MoEStats|None)."""
    x_BTD, stats = self.block(self._input(h_prev_BTD, emb_next_BTD), pos_BT, segment_ids_BT,
                              valid_BT, bias_E)
    x_BTD = constrain(x_BTD, ("batch", "length", None))
    return x_BTD, self.final_norm(x_BTD), stats

  def decode(self, h_prev_BTD, emb_next_BTD, cache, layer: int, n_new_B, valid_BT, bias_E,
             absorb: bool = True):
    """The module on a chunk against its own KV cache (layer `layer` of an MTP cache).
    Returns (h_k, normed h_k, cache, MoEStats|None)."""
    x_BTD, cache, stats = self.block.decode(self._input(h_prev_BTD, emb_next_BTD), cache,
                                            layer, n_new_B, valid_BT, bias_E, absorb)
    return x_BTD, self.final_norm(x_BTD), cache, stats
