"""The DeepSeek-V3 model: embedding, decoder blocks (dense first, then MoE), final norm,
output head, and the MTP modules that share the embedding and the head.

Balancing state lives in its own variable collection, "balance": one float32 array
`expert_bias` [L, E] with a row per routed layer (main MoE layers in order, then the MTP
blocks). It is read, never written, by the model: the train step updates it from the
MoEStats the model returns (stacked the same way, leading dim L).

Inference (kv_cache.py, decoding.py, speculative.py) uses two more methods on the same
parameters: `extend` runs a chunk of tokens against a latent KV cache (prefill, decode,
verification), `mtp_extend` runs one MTP module against its own cache (drafting).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from deepseek_jax.model.block import Block
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.kv_cache import KVCache
from deepseek_jax.model.layers import RMSNorm, param
from deepseek_jax.model.moe import MoEStats
from deepseek_jax.model.mtp import MTPModule, shift_left

BALANCE = "balance"


@struct.dataclass
class ModelOutput:
  logits: jax.Array                  # [B, T, V] float32: predicts token i+1 at position i
  mtp_logits: jax.Array | None       # [D_mtp, B, T, V]: depth k predicts token i+k+1
  moe: MoEStats | None               # stacked over routed layers, leading dim L
  hidden: jax.Array                  # [B, T, D] last hidden state before the final norm


@struct.dataclass
class DecodeOutput:
  logits: jax.Array    # [B, T, V] float32
  hidden: jax.Array    # [B, T, D] what the next MTP module reads (cfg.mtp_feed_normed)


def _stack(stats):
  stats = [s for s in stats if s is not None]
  if not stats:
    return None
  return jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
    block_cls = nn.remat(Block) if cfg.remat else Block
    self.blocks = [block_cls(cfg, moe=cfg.is_moe_layer(i), name=f"layer_{i}")
                   for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.head = param(self, "head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)
    self.mtp = [MTPModule(cfg, name=f"mtp_{k}") for k in range(cfg.mtp_depth)]
    if cfg.n_routed_layers:
      init = jnp.ones if cfg.bias_mode == "mul" else jnp.zeros   # neutral bias
      self.expert_bias = self.variable(
          BALANCE, "expert_bias", init, (cfg.n_routed_layers, cfg.n_routed_experts),
          jnp.float32)

  def embed_tokens(self, tokens_BT):
    return jnp.take(self.embed, tokens_BT, axis=0).astype(self.cfg.jnp_dtype)

  def logits(self, normed_BTD):
    w_DV = self.embed.T if self.cfg.tie_embeddings else self.head
    return jnp.einsum("BTD,DV->BTV", normed_BTD, w_DV.astype(self.cfg.jnp_dtype),
                      preferred_element_type=jnp.float32)

  def _bias(self, row):
    if not self.cfg.n_routed_layers:
      return None
    return self.expert_bias.value[row]

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, mtp=True):
    """tokens [B, T] int; positions default to 0..T-1; segment_ids (packed documents,
    0 = padding) restrict attention to the same document when given."""
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid_BT = (jnp.ones((B, T), bool) if segment_ids_BT is None else segment_ids_BT != 0)

    x_BTD = self.embed_tokens(tokens_BT)
    stats, row = [], 0
    for i, block in enumerate(self.blocks):
      x_BTD, s = block(x_BTD, positions_BT, segment_ids_BT, valid_BT,
                       self._bias(row) if cfg.is_moe_layer(i) else None)
      if s is not None:
        stats.append(s)
        row += 1
    logits_BTV = self.logits(self.final_norm(x_BTD))

    mtp_logits = None
    if mtp and cfg.mtp_depth:
      h_BTD = self.final_norm(x_BTD) if cfg.mtp_feed_normed else x_BTD
      depth_logits = []
      for k, module in enumerate(self.mtp, start=1):
        # Position i reads token i+k: valid only if it exists in the same document.
        valid_k = shift_left(valid_BT, k, False) & valid_BT
        if segment_ids_BT is not None:
          valid_k &= shift_left(segment_ids_BT, k) == segment_ids_BT
        h_BTD, normed_BTD, s = module(
            h_BTD, self.embed_tokens(shift_left(tokens_BT, k)), positions_BT,
            segment_ids_BT, valid_k, self._bias(row) if cfg.mtp_is_moe else None)
        if cfg.mtp_feed_normed:
          h_BTD = normed_BTD
        if s is not None:
          stats.append(s)
          row += 1
        depth_logits.append(self.logits(normed_BTD))
      mtp_logits = jnp.stack(depth_logits)
    elif cfg.mtp_is_moe and cfg.mtp_depth and stats:
      # Keep the stats' L dim equal to the bias rows; skipped MTP layers route nothing.
      zero = jax.tree.map(jnp.zeros_like, stats[-1])
      stats.extend([zero] * cfg.mtp_depth)
    return ModelOutput(logits=logits_BTV, mtp_logits=mtp_logits, moe=_stack(stats),
                       hidden=x_BTD)

  # Inference ------------------------------------------------------------------------

  def extend(self, tokens_BT, cache: KVCache, n_new_B=None, *, absorb: bool = True):
    """Runs a chunk of T tokens per row after its cache.lengths cached tokens, at RoPE
    positions lengths .. lengths+T-1 (a prompt chunk, one decode token, or the
    speculative drafts). n_new_B [B] of the T are real, the rest padding (default all).

    Returns (DecodeOutput, cache with the chunk written and lengths advanced by n_new).
    The logits equal those of __call__ on the whole sequence at the same positions.
    """
    cfg = self.cfg
    B, T = tokens_BT.shape
    if n_new_B is None:
      n_new_B = jnp.full((B,), T, jnp.int32)
    valid_BT = jnp.arange(T)[None, :] < n_new_B[:, None]
    x_BTD = self.embed_tokens(tokens_BT)
    for i, block in enumerate(self.blocks):
      bias = self._bias(i - cfg.first_k_dense) if cfg.is_moe_layer(i) else None
      x_BTD, cache, _ = block.decode(x_BTD, cache, i, n_new_B, valid_BT, bias, absorb)
    normed_BTD = self.final_norm(x_BTD)
    out = DecodeOutput(logits=self.logits(normed_BTD),
                       hidden=normed_BTD if cfg.mtp_feed_normed else x_BTD)
    return out, cache.with_lengths(cache.lengths + n_new_B)

  def mtp_extend(self, k: int, h_prev_BTD, tokens_next_BT, cache: KVCache, n_new_B, *,
                 absorb: bool = True):
    """MTP module k (1-based) on a chunk: position i reads h_{k-1}[i] and token i+k
    (tokens_next_BT), and its logits predict token i+k+1; as in __call__.

    `cache` is the MTP cache, layer k-1 being module k's. Its lengths are NOT advanced:
    the D modules cover the same positions, so the caller sets them once.
    Returns (DecodeOutput with hidden = h_k as module k+1 reads it, cache).
    """
    cfg = self.cfg
    T = tokens_next_BT.shape[1]
    valid_BT = jnp.arange(T)[None, :] < n_new_B[:, None]
    bias = self._bias(cfg.n_moe_layers + k - 1) if cfg.mtp_is_moe else None
    h_BTD, normed_BTD, cache, _ = self.mtp[k - 1].decode(
        h_prev_BTD, self.embed_tokens(tokens_next_BT), cache, k - 1, n_new_B, valid_BT,
        bias, absorb)
    out = DecodeOutput(logits=self.logits(normed_BTD),
                       hidden=normed_BTD if cfg.mtp_feed_normed else h_BTD)
    return out, cache


def init_variables(model: Transformer, rng, batch=1, seq=8):
  """Unboxed variables {"params": ..., "balance": ...} (balance absent with no MoE)."""
  tokens = jnp.zeros((batch, seq), jnp.int32)
  return nn.unbox(model.init(rng, tokens))


def abstract_variables(model: Transformer, batch=1, seq=8):
  """Boxed ShapeDtypeStructs with logical axis metadata, allocating nothing."""
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
