"""The MHA counterfactual of the latent cache: the same model caching per-head K and V.

What V3's heads would cache without MLA: per layer and token, a key of N x (H + P) and a
value of N x O (128 x 192 and 128 x 128 for V3: 40,960 values against the latent's 576).
The construction is the model itself, not a second one: each new token's K and V are
up-projected from its latent with the layer's own W_UK / W_UV (attention.up_project,
the rope key broadcast to every head), written into this cache expanded, and attention
is standard per-head attention over the expanded cache (attend_plain's products). It is
mathematically the model's latent-cached decode (Transformer.extend), so its logits equal
those within float rounding (tests/inference/test_mha_cache.py); only what the cache
holds differs, which is what inference/compile_decode.py compares.

Shapes: L layers, B requests, S cached positions, T new tokens, N heads, K = H + P the
qk head dim, O the value head dim, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from deepseek_jax.model.attention import masked_softmax, up_project
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.kv_cache import cache_mask
from deepseek_jax.model.layers import softmax_scale
from deepseek_jax.model.transformer import DecodeOutput


@struct.dataclass
class MHACache:
  # Head-major ([.., N, S, ..]): the score and value products batch over (B, N) with S
  # and the head dim minor, so no step transposes a layer's cache (with [B, S, N, K]
  # the TPU compile of V3's 64 requests at 32K held ~62 GB of temporaries beyond it).
  k: jax.Array         # [L, B, N, S, K] per-head keys, rope part included
  v: jax.Array         # [L, B, N, S, O] per-head values
  lengths: jax.Array   # [B] int32 valid tokens of each row

  @property
  def max_len(self) -> int:
    return self.k.shape[3]

  def layer(self, i: int):
    """(k [B,N,S,K], v [B,N,S,O]) of layer i."""
    return self.k[i], self.v[i]

  def write(self, i: int, k_BTNK, v_BTNO) -> "MHACache":
    """Layer i with the chunk written at each row's current length (as KVCache.write:
    indices past the end dropped, lengths unchanged).

    A select over the layer per new token, not a scatter: the TPU compile of the
    scatter held several copies of the cache in temporaries (about 6x the cache on
    the tpu_smoke model, none without the write), which a select written back with
    one dynamic_update_slice of layer i does not need. T is small (decode, drafts)."""
    S = self.max_len
    s_BT = self.lengths[:, None] + jnp.arange(k_BTNK.shape[1])
    k_BNSK, v_BNSO = self.k[i], self.v[i]
    for t in range(k_BTNK.shape[1]):
      hit_B1S1 = (s_BT[:, t, None] == jnp.arange(S))[:, None, :, None]
      k_BNSK = jnp.where(hit_B1S1, k_BTNK[:, t, :, None].astype(k_BNSK.dtype), k_BNSK)
      v_BNSO = jnp.where(hit_B1S1, v_BTNO[:, t, :, None].astype(v_BNSO.dtype), v_BNSO)
    return self.replace(k=self.k.at[i].set(k_BNSK), v=self.v.at[i].set(v_BNSO))

  @property
  def values_per_token(self) -> int:
    """Cached values per token over all layers: L x N x (K + O)."""
    L, _, N, _, K = self.k.shape
    return L * N * (K + self.v.shape[-1])


def create(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype=None) -> MHACache:
  """An empty per-head cache, in `dtype` (default: the compute dtype)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  N, K, O = cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim
  return MHACache(k=jnp.zeros((n_layers, batch, N, max_len, K), dtype),
                  v=jnp.zeros((n_layers, batch, N, max_len, O), dtype),
                  lengths=jnp.zeros((batch,), jnp.int32))


def _attention(attn, x_BTD, cache: MHACache, layer: int, n_new_B):
  """MLA.decode with the expanded cache: the chunk's K and V up-projected from its own
  latents and written per head; standard attention over the cache's K and V."""
  T = x_BTD.shape[1]
  start_B = cache.lengths
  pos_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)
  q_nope_BTNH, q_rope_BTNP = attn.queries(x_BTD, pos_BT)
  c_kv_BTR, k_rope_BTP = attn.latents(x_BTD, pos_BT)
  k_BTNK, v_BTNO = up_project(c_kv_BTR, k_rope_BTP, attn._w(attn.w_uk), attn._w(attn.w_uv))
  cache = cache.write(layer, k_BTNK, v_BTNO)
  dt = attn.cfg.jnp_dtype
  k_BNSK, v_BNSO = (a.astype(dt) for a in cache.layer(layer))
  q_BTNK = jnp.concatenate([q_nope_BTNH, q_rope_BTNP], axis=-1) * softmax_scale(attn.cfg)
  mask_B1TS = cache_mask(start_B, n_new_B, T, cache.max_len)
  # attention.attend_plain's products on the head-major cache.
  scores_BNTS = jnp.einsum("BTNK,BNSK->BNTS", q_BTNK, k_BNSK,
                           preferred_element_type=jnp.float32)
  probs_BNTS = masked_softmax(scores_BNTS, mask_B1TS).astype(v_BNSO.dtype)
  o_BTNO = jnp.einsum("BNTS,BNSO->BTNO", probs_BNTS, v_BNSO)
  return attn.output(o_BTNO), cache


def extend(model, tokens_BT, cache: MHACache, n_new_B=None):
  """Transformer.extend against an MHACache: call as
  `Transformer(cfg).apply(variables, tokens, cache, method=mha_cache.extend)`.
  Returns (DecodeOutput, cache with the chunk written and lengths advanced)."""
  cfg = model.cfg
  if cfg.scan_layers:
    raise ValueError("mha_cache.extend runs the unrolled layout (scan_layers=False)")
  B, T = tokens_BT.shape
  if n_new_B is None:
    n_new_B = jnp.full((B,), T, jnp.int32)
  valid_BT = jnp.arange(T)[None, :] < n_new_B[:, None]
  x_BTD = model.embed_tokens(tokens_BT)
  for i, block in enumerate(model.blocks):
    bias_E = model._bias(i - cfg.first_k_dense) if cfg.is_moe_layer(i) else None
    a_BTD, cache = _attention(block.attn, block.attn_norm(x_BTD), cache, i, n_new_B)
    x_BTD, _ = block._ffn(x_BTD + a_BTD, valid_BT, bias_E)
  normed_BTD = model.final_norm(x_BTD)
  out = DecodeOutput(logits=model.logits(normed_BTD),
                     hidden=normed_BTD if cfg.mtp_feed_normed else x_BTD)
  return out, cache.replace(lengths=cache.lengths + n_new_B)
