"""The paged latent cache: MLA's (c_kv, k_rope) in fixed-size pages, a page table per row.

The dense cache (kv_cache.py) gives every row max_len positions whether it uses them or
not. Here the layers share one pool of pages ([L, n_pages, page, R] and [.., P]); row b
owns the pages its table lists (pages[b, j] holds its positions j*page .. (j+1)*page - 1),
so a short request holds few pages and a finished one hands them back (vLLM's
PagedAttention, with MLA's single latent head: 576 values a token a layer for V3).

The fp8 layout (DeepSeek's FlashMLA cache, 656 bytes a token a layer for V3): c_kv in
float8 e4m3 with one float32 scale per 128 values (absmax / 448; one per token when R is
not a multiple of 128), the rope key kept in bfloat16: 512 + 4 x 4 + 64 x 2 bytes.
Writes quantise, reads dequantise.

Same interface as KVCache (write / layer / lengths / max_len / with_lengths), so the
model's cached decode (Transformer.extend) runs on either unchanged; attention reads a
row's pages through its table. Table entries that own no page hold NO_PAGE (= n_pages):
writes there are dropped and reads give zeros, which the length mask hides, so padding
tokens and idle rows can never touch another row's pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from deepseek_jax.model.config import ModelConfig


@struct.dataclass
class PagedCache:
  c_kv: jax.Array      # [L, n_pages, page, R] the latent pool
  k_rope: jax.Array    # [L, n_pages, page, P] the rope-key pool
  pages: jax.Array     # [B, max_pages] int32: page ids of each row's positions, in order
  lengths: jax.Array   # [B] int32 valid tokens of each row
  # fp8 layout only: [L, n_pages, page, blocks] float32 scales of c_kv's blocks
  c_kv_scale: jax.Array | None = None
  compute_dtype: str = struct.field(pytree_node=False, default="float32")

  @property
  def n_pages(self) -> int:
    return self.c_kv.shape[1]

  @property
  def page_size(self) -> int:
    return self.c_kv.shape[2]

  @property
  def max_len(self) -> int:
    return self.pages.shape[1] * self.page_size

  def with_lengths(self, lengths_B) -> "PagedCache":
    return self.replace(lengths=lengths_B.astype(jnp.int32))

  def layer(self, i: int):
    """(c_kv [B,S,R], k_rope [B,S,P]) of layer i, S = max_len, gathered through the table
    (positions on no page read as zeros)."""
    B, J = self.pages.shape

    def gather(pool):
      x = pool[i].at[self.pages].get(mode="fill", fill_value=0)   # [B, J, page, C]
      return x.reshape(B, J * self.page_size, *pool.shape[3:])
    if self.c_kv_scale is None:
      return gather(self.c_kv), gather(self.k_rope)
    q_BSGK = gather(self.c_kv).reshape(B, J * self.page_size, self.c_kv_scale.shape[-1], -1)
    c_kv = q_BSGK.astype(jnp.float32) * gather(self.c_kv_scale)[..., None]
    return (c_kv.reshape(B, J * self.page_size, -1).astype(self.compute_dtype),
            gather(self.k_rope))

  def write(self, i: int, c_kv_BTR, k_rope_BTP) -> "PagedCache":
    """Layer i with the chunk written at each row's current length (lengths unchanged);
    a position past max_len or on no page is dropped."""
    B, T = c_kv_BTR.shape[:2]
    s_BT = self.lengths[:, None] + jnp.arange(T)
    j_BT = s_BT // self.page_size
    page_BT = jnp.take_along_axis(self.pages, jnp.minimum(j_BT, self.pages.shape[1] - 1),
                                  axis=1)
    page_BT = jnp.where(j_BT < self.pages.shape[1], page_BT, self.n_pages)   # dropped
    off_BT = s_BT % self.page_size
    k_rope = self.k_rope.at[i, page_BT, off_BT].set(k_rope_BTP.astype(self.k_rope.dtype),
                                                    mode="drop")
    if self.c_kv_scale is None:
      c_kv = self.c_kv.at[i, page_BT, off_BT].set(c_kv_BTR.astype(self.c_kv.dtype),
                                                  mode="drop")
      return self.replace(c_kv=c_kv, k_rope=k_rope)
    q_BTR, scale_BTG = quantize_fp8(c_kv_BTR, self.c_kv_scale.shape[-1])
    c_kv = self.c_kv.at[i, page_BT, off_BT].set(q_BTR, mode="drop")
    scale = self.c_kv_scale.at[i, page_BT, off_BT].set(scale_BTG, mode="drop")
    return self.replace(c_kv=c_kv, k_rope=k_rope, c_kv_scale=scale)

  def rows(self, pages_BJ, lengths_B) -> "PagedCache":
    """The same pools seen through another page table (e.g. one row's, for a prefill)."""
    return self.replace(pages=pages_BJ.astype(jnp.int32), lengths=lengths_B.astype(jnp.int32))

  @property
  def values_per_token(self) -> int:
    """Cached values per token over all layers: L x (R + P)."""
    return self.c_kv.shape[0] * (self.c_kv.shape[-1] + self.k_rope.shape[-1])

  @property
  def nbytes(self) -> int:
    scale = 0 if self.c_kv_scale is None else self.c_kv_scale.nbytes
    return int(self.c_kv.nbytes + self.k_rope.nbytes + scale)

  @property
  def bytes_per_token_layer(self) -> int:
    """Bytes one position of one layer takes: (R + P) x itemsize, 656 in V3's fp8."""
    return self.nbytes // (self.c_kv.shape[0] * self.n_pages * self.page_size)


FP8_BLOCK = 128               # c_kv values per float32 scale (FlashMLA's tile)
FP8_MAX = 448.0               # the largest float8 e4m3 value


def fp8_blocks(R: int) -> int:
  """Scales per token: one per 128 values (one per token when R is not a multiple)."""
  return R // FP8_BLOCK if R % FP8_BLOCK == 0 else 1


def quantize_fp8(x_BTR, n_blocks: int):
  """(float8 e4m3 values [B,T,R], float32 scales [B,T,n_blocks]): each block of values
  divided by its absmax / 448."""
  B, T, R = x_BTR.shape
  x_BTGK = x_BTR.astype(jnp.float32).reshape(B, T, n_blocks, R // n_blocks)
  scale_BTG = jnp.maximum(jnp.abs(x_BTGK).max(-1) / FP8_MAX, 1e-12)
  q_BTGK = (x_BTGK / scale_BTG[..., None]).astype(jnp.float8_e4m3fn)
  return q_BTGK.reshape(B, T, R), scale_BTG


def create(cfg: ModelConfig, n_layers: int, n_pages: int, page_size: int, batch: int,
           max_pages: int, dtype=None) -> PagedCache:
  """A pool of n_pages pages of page_size positions for n_layers layers, and a table of
  `batch` rows of max_pages entries that own no page yet. dtype "fp8": FlashMLA's layout
  (c_kv float8 e4m3 with a float32 scale per 128 values, the rope key bfloat16); else
  both in dtype (default: the compute dtype)."""
  R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
  table = jnp.full((batch, max_pages), n_pages, jnp.int32)
  lengths = jnp.zeros((batch,), jnp.int32)
  if dtype == "fp8":
    return PagedCache(
        c_kv=jnp.zeros((n_layers, n_pages, page_size, R), jnp.float8_e4m3fn),
        k_rope=jnp.zeros((n_layers, n_pages, page_size, P), jnp.bfloat16),
        pages=table, lengths=lengths,
        c_kv_scale=jnp.zeros((n_layers, n_pages, page_size, fp8_blocks(R)), jnp.float32),
        compute_dtype=cfg.dtype)
  dtype = jnp.dtype(dtype or cfg.dtype)
  return PagedCache(c_kv=jnp.zeros((n_layers, n_pages, page_size, R), dtype),
                    k_rope=jnp.zeros((n_layers, n_pages, page_size, P), dtype),
                    pages=table, lengths=lengths, compute_dtype=cfg.dtype)
