"""Multi-Head Latent Attention (V3 eqs 1-11; V2 Sec. 2.1): training and cached decode.

Keys and values are compressed jointly into one latent c_kv (R values per token) and a
single rope key k_R (P values) shared by every head; only these two are what a KV cache
holds. Weight names follow the report: W_DQ/W_UQ/W_QR for the query, W_DKV/W_UK/W_UV/W_KR
for keys and values, W_O for the output.

Cached decode (`decode`) attends over the latent cache in one of two ways:
  absorbed  (V2 App. C) W_UK folded into the query, q_lat = q_nope . W_UK [B,T,N,R];
            score = q_lat . c_kv + q_rope . k_R; attend over c_kv, then W_UV, then W_O.
            Per step O(S N (R + P)): no per-key up-projection, K and V never exist.
  expanded  re-expands K and V for every cached key each step (O(S R N (H + O))), as a
            cache that saves memory but not compute does; kept for comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.kv_cache import KVCache, cache_mask
from deepseek_jax.model.layers import RMSNorm, apply_rope, param, softmax_scale

# The latent norms use a fixed 1e-6 in DeepSeek's code and in HF, whatever rms_norm_eps.
LATENT_NORM_EPS = 1e-6
NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax, not NaN


def attention_mask(q_pos_BT, k_pos_BS, q_seg_BT=None, k_seg_BS=None):
  """[B, 1, T, S] bool: causal on token index, and same packed document when segments given.

  Causality uses the index in the (cached) sequence, not the rope position, so a packed
  row whose positions restart at each document is still causal.
  """
  mask = q_pos_BT[:, :, None] >= k_pos_BS[:, None, :]
  if q_seg_BT is not None:
    mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
  return mask[:, None]


class MLA(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    D, N, H, P, O, R = (cfg.d_model, cfg.n_heads, cfg.qk_nope_head_dim,
                        cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
    if cfg.q_lora_rank is None:
      self.w_q_nope = param(self, "w_q_nope", (D, N, H), ("embed", "heads", "head_dim"), cfg)
      self.w_q_rope = param(self, "w_q_rope", (D, N, P), ("embed", "heads", "head_dim"), cfg)
    else:
      Q = cfg.q_lora_rank
      self.w_dq = param(self, "w_dq", (D, Q), ("embed", "q_lora"), cfg)
      self.q_norm = RMSNorm(cfg, axis_name="q_lora", eps=LATENT_NORM_EPS)
      self.w_uq = param(self, "w_uq", (Q, N, H), ("q_lora", "heads", "head_dim"), cfg)
      self.w_qr = param(self, "w_qr", (Q, N, P), ("q_lora", "heads", "head_dim"), cfg)
    self.w_dkv = param(self, "w_dkv", (D, R), ("embed", "kv_lora"), cfg)
    self.kv_norm = RMSNorm(cfg, axis_name="kv_lora", eps=LATENT_NORM_EPS)
    self.w_kr = param(self, "w_kr", (D, P), ("embed", "head_dim"), cfg)
    self.w_uk = param(self, "w_uk", (R, N, H), ("kv_lora", "heads", "head_dim"), cfg)
    self.w_uv = param(self, "w_uv", (R, N, O), ("kv_lora", "heads", "head_dim"), cfg)
    self.w_o = param(self, "w_o", (N, O, D), ("heads", "head_dim", "embed"), cfg)

  def _w(self, w):
    return w.astype(self.cfg.jnp_dtype)

  def queries(self, x_BTD, pos_BT):
    """(q_nope [B,T,N,H], q_rope [B,T,N,P] after RoPE)."""
    x = x_BTD.astype(self.cfg.jnp_dtype)
    if self.cfg.q_lora_rank is None:
      q_nope = jnp.einsum("BTD,DNH->BTNH", x, self._w(self.w_q_nope))
      q_rope = jnp.einsum("BTD,DNP->BTNP", x, self._w(self.w_q_rope))
    else:
      c_BTQ = self.q_norm(jnp.einsum("BTD,DQ->BTQ", x, self._w(self.w_dq)))
      q_nope = jnp.einsum("BTQ,QNH->BTNH", c_BTQ, self._w(self.w_uq))
      q_rope = jnp.einsum("BTQ,QNP->BTNP", c_BTQ, self._w(self.w_qr))
    return q_nope, apply_rope(q_rope, pos_BT, self.cfg)

  def latents(self, x_BTD, pos_BT):
    """What a KV cache holds: (normalised c_kv [B,T,R], roped shared key k_R [B,T,P])."""
    x = x_BTD.astype(self.cfg.jnp_dtype)
    c_kv = self.kv_norm(jnp.einsum("BTD,DR->BTR", x, self._w(self.w_dkv)))
    k_rope = apply_rope(jnp.einsum("BTD,DP->BTP", x, self._w(self.w_kr)), pos_BT, self.cfg)
    return c_kv, k_rope

  def attend_expanded(self, q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP, mask_B1TS):
    """Attention with K and V re-expanded from the latent (training and naive decode)."""
    k_nope_BSNH = jnp.einsum("BSR,RNH->BSNH", c_kv_BSR, self._w(self.w_uk))
    v_BSNO = jnp.einsum("BSR,RNO->BSNO", c_kv_BSR, self._w(self.w_uv))
    # One score product over [nope | rope] (K = H + P), the shared rope key broadcast to
    # every head: a single [B,N,T,S] output instead of two summed ones.
    B, S, N, _ = k_nope_BSNH.shape
    k_rope_BSNP = jnp.broadcast_to(k_rope_BSP[:, :, None, :], (B, S, N, k_rope_BSP.shape[-1]))
    # The softmax scale goes on the query ([B,T,N,K]) rather than on the scores.
    q_BTNK = jnp.concatenate([q_nope_BTNH, q_rope_BTNP], axis=-1) * softmax_scale(self.cfg)
    k_BSNK = jnp.concatenate([k_nope_BSNH, k_rope_BSNP.astype(k_nope_BSNH.dtype)], axis=-1)
    # Head-major operands: the batched products then run over leading [B, N] dims.
    q_BNTK = q_BTNK.transpose(0, 2, 1, 3)
    k_BNSK = k_BSNK.transpose(0, 2, 1, 3)
    v_BNSO = v_BSNO.transpose(0, 2, 1, 3)
    scores = jnp.einsum("BNTK,BNSK->BNTS", q_BNTK, k_BNSK, preferred_element_type=jnp.float32)
    probs = self._softmax(scores, mask_B1TS, scale=1.0).astype(v_BSNO.dtype)
    o_BNTO = jnp.einsum("BNTS,BNSO->BNTO", probs, v_BNSO)
    return jnp.einsum("BNTO,NOD->BTD", o_BNTO, self._w(self.w_o))

  def _softmax(self, scores_BNTS, mask_B1TS, scale=None):
    scale = softmax_scale(self.cfg) if scale is None else scale
    scores = scores_BNTS.astype(jnp.float32) * scale
    return jax.nn.softmax(jnp.where(mask_B1TS, scores, NEG_INF), axis=-1)

  def __call__(self, x_BTD, pos_BT, segment_ids_BT=None):
    q_nope, q_rope = self.queries(x_BTD, pos_BT)
    c_kv, k_rope = self.latents(x_BTD, pos_BT)
    idx_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
    mask = attention_mask(idx_BT, idx_BT, segment_ids_BT, segment_ids_BT)
    return self.attend_expanded(q_nope, q_rope, c_kv, k_rope, mask)

  def attend_absorbed(self, q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP, mask_B1TS):
    """The same attention as attend_expanded with W_UK and W_UV absorbed (V2 App. C)."""
    f32 = jnp.float32
    # Query into latent space: (q_nope W_UK^T) . c_kv == q_nope . (W_UK c_kv) = q . k_C.
    q_lat_BTNR = jnp.einsum("BTNH,RNH->BTNR", q_nope_BTNH, self._w(self.w_uk))
    scores = (jnp.einsum("BTNR,BSR->BNTS", q_lat_BTNR, c_kv_BSR, preferred_element_type=f32)
              + jnp.einsum("BTNP,BSP->BNTS", q_rope_BTNP, k_rope_BSP, preferred_element_type=f32))
    probs = self._softmax(scores, mask_B1TS).astype(c_kv_BSR.dtype)
    # sum_s p_s (W_UV c_s) == W_UV (sum_s p_s c_s): attend over the latent, expand once.
    # Output [B,N,T,R], not [B,T,N,R]: the latter made XLA:CPU 3-6x slower here.
    o_lat_BNTR = jnp.einsum("BNTS,BSR->BNTR", probs, c_kv_BSR)
    o_BTNO = jnp.einsum("BNTR,RNO->BTNO", o_lat_BNTR, self._w(self.w_uv))
    return jnp.einsum("BTNO,NOD->BTD", o_BTNO, self._w(self.w_o))

  def decode(self, x_BTD, cache: KVCache, layer: int, n_new_B, absorb: bool = True):
    """A chunk of T tokens of each row, at cache indices lengths .. lengths+T-1 (their RoPE
    positions), n_new_B of them real (the rest padding). Writes their latents into the
    cache's `layer` and attends over the cache. Returns (y_BTD, cache); lengths unchanged.
    """
    B, T, _ = x_BTD.shape
    start_B = cache.lengths
    pos_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)
    q_nope, q_rope = self.queries(x_BTD, pos_BT)
    c_kv, k_rope = self.latents(x_BTD, pos_BT)
    cache = cache.write(layer, c_kv, k_rope)
    dt = self.cfg.jnp_dtype
    c_kv_BSR, k_rope_BSP = (a.astype(dt) for a in cache.layer(layer))
    mask = cache_mask(start_B, n_new_B, T, cache.max_len)
    attend = self.attend_absorbed if absorb else self.attend_expanded
    return attend(q_nope, q_rope, c_kv_BSR, k_rope_BSP, mask), cache
