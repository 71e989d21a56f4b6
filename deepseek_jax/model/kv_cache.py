"""The MLA latent KV cache: per layer, only the normalised latent c_kv and the roped
shared key k_R (SPEC 1: R + P values per token per layer, 576 at V3 sizes).

Rows are right-aligned at index 0: sequence b's tokens sit at cache indices
0 .. lengths[b]-1, and a token's cache index is its RoPE position. Preallocated to a
static max length, so every decode step compiles once. A write puts a chunk of T tokens
at lengths[b] .. lengths[b]+T-1 (indices past the end are dropped, never clamped onto
valid entries); the caller then advances lengths by each row's count of real tokens.
Rolling back after rejected speculative tokens is just setting smaller lengths: entries
past a row's length are masked out of attention and overwritten by the next write.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from deepseek_jax.model.config import ModelConfig


@struct.dataclass
class KVCache:
  c_kv: jax.Array      # [L, B, S, R] normalised KV latent
  k_rope: jax.Array    # [L, B, S, P] shared rope key, after RoPE
  lengths: jax.Array   # [B] int32 valid tokens of each row

  @property
  def max_len(self) -> int:
    return self.c_kv.shape[2]

  def with_lengths(self, lengths_B) -> "KVCache":
    return self.replace(lengths=lengths_B.astype(jnp.int32))

  def layer(self, i: int):
    """(c_kv [B,S,R], k_rope [B,S,P]) of layer i."""
    return self.c_kv[i], self.k_rope[i]

  def write(self, i: int, c_kv_BTR, k_rope_BTP) -> "KVCache":
    """Layer i with the chunk written at each row's current length (lengths unchanged)."""
    B, T = c_kv_BTR.shape[:2]
    b_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    s_BT = self.lengths[:, None] + jnp.arange(T)
    # mode="drop": an index past max_len is skipped; a dynamic_update_slice would clamp
    # the start and silently overwrite valid entries.
    c_kv = self.c_kv.at[i, b_BT, s_BT].set(c_kv_BTR.astype(self.c_kv.dtype), mode="drop")
    k_rope = self.k_rope.at[i, b_BT, s_BT].set(k_rope_BTP.astype(self.k_rope.dtype),
                                               mode="drop")
    return self.replace(c_kv=c_kv, k_rope=k_rope)

  @property
  def values_per_token(self) -> int:
    """Cached values per token over all layers: L x (R + P)."""
    L, _, _, R = self.c_kv.shape
    return L * (R + self.k_rope.shape[-1])

  @property
  def nbytes(self) -> int:
    return int(self.c_kv.nbytes + self.k_rope.nbytes)


def create(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of n_layers layers (cfg.n_layers for the main model, cfg.mtp_depth
  for the MTP drafters), in `dtype` (default: the compute dtype)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
  return KVCache(c_kv=jnp.zeros((n_layers, batch, max_len, R), dtype),
                 k_rope=jnp.zeros((n_layers, batch, max_len, P), dtype),
                 lengths=jnp.zeros((batch,), jnp.int32))


def cache_mask(start_B, n_new_B, T: int, S: int):
  """[B, 1, T, S] bool for a chunk of T queries written at start: causal on the cache
  index, and no key at or past the row's new length (stale entries of a rollback)."""
  q_idx_BT = start_B[:, None] + jnp.arange(T)
  k_idx_S = jnp.arange(S)
  mask_BTS = (k_idx_S[None, None, :] <= q_idx_BT[:, :, None]) & (
      k_idx_S[None, None, :] < (start_B + n_new_B)[:, None, None])
  return mask_BTS[:, None]


# What other attention layouts would cache, for the comparison of SPEC section 1 --------

def kv_values_per_token_layer(cfg: ModelConfig) -> dict[str, int]:
  """Cached values per token per layer: MLA against MHA / GQA(8) / MQA of the same heads.

  MHA caches a key and a value per head (keys of the nope width, as SPEC 1 counts them:
  2 * N * H); GQA with g groups 2 * g * H; MQA one group.
  """
  N, H = cfg.n_heads, cfg.qk_nope_head_dim
  return {"MLA": cfg.kv_lora_rank + cfg.qk_rope_head_dim, "MHA": 2 * N * H,
          "GQA-8": 2 * 8 * H, "MQA": 2 * H}
