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

Training (`__call__`) expands K and V and attends either "plain" (the [B, N, T, S] scores
in one piece) or "blockwise" (`blockwise_attention`: online softmax, at most one query
block's scores at a time, forward and backward), or "blockwise_latent" (the same loops,
K and V up-projected one key block at a time: never whole, for the longest contexts),
or on GPUs through a library's fused
kernel ("cudnn", "tokamax": fused_attention.py). K = H + P is the qk head dim here. In
blockwise_attention, I counts query blocks and J key blocks; T and S are then block lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

from deepseek_jax.model import context_parallel, fused_attention
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.kv_cache import KVCache, cache_mask
from deepseek_jax.model.layers import (RMSNorm, apply_rope, linear, param, softmax_scale,
                                       target_platform)
from deepseek_jax.model.partitioning import constrain

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


def blockwise_attention(q_BTNK, k_BSNK, v_BSNO, q_idx_BT, k_idx_BS, q_seg_BT=None,
                        k_seg_BS=None, *, block: int):
  """softmax(q . k, masked as attention_mask) . v [B,T,N,O] without the [B,N,T,S] scores.

  q carries the softmax scale already. Same masking as the plain path: causal on index,
  same document when segments are given, and a fully masked row uniform over the S keys
  (what a softmax over all-NEG_INF scores gives). Query blocks run under jax.checkpoint,
  so the backward holds the residuals of one query block ([B, N, block, S]) at a time,
  never those of all of them. T and S need not be multiples of `block`: the last blocks
  are padded (block is capped at T and at S, so short sequences are one block). Key
  blocks wholly above the causal diagonal for every row are skipped by a lax.cond inside
  a fixed-length scan, which stays reverse-differentiable. Returns v's dtype; scores, the
  running max and sum, and the output accumulate in float32.
  """
  return _blockwise(q_BTNK, (k_BSNK, v_BSNO), lambda k, v: (k, v),
                    v_BSNO.astype(jnp.float32).mean(axis=1), v_BSNO.dtype, q_idx_BT,
                    k_idx_BS, q_seg_BT, k_seg_BS, block)


def blockwise_latent_attention(q_BTNK, c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO, q_idx_BT,
                               k_idx_BS, q_seg_BT=None, k_seg_BS=None, *, block: int):
  """blockwise_attention with K and V up-projected from the latent one key block at a
  time, inside the loop (attention_impl "blockwise_latent"): the whole sequence's K and
  V ([B, S, N, H + P + O]) never exist, forward or backward, whose gradient accumulates
  into the latent instead. The price: each live tile re-expands its key block (about
  0.8x the tile's attention FLOPs again for V3's dims). q is scaled and [nope | rope]."""
  def expand(c_kv_BSR, k_rope_BSP):   # one key block, batched: not saved per block
    return up_project(c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO, batched_weights=True)

  # A fully masked row's answer, the mean of the S values, is mean(c_kv) . W_UV.
  v_mean_BNO = jnp.einsum("BR,RNO->BNO", c_kv_BSR.astype(jnp.float32).mean(axis=1),
                          w_uv_RNO.astype(jnp.float32))
  return _blockwise(q_BTNK, (c_kv_BSR, k_rope_BSP), expand, v_mean_BNO, c_kv_BSR.dtype,
                    q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS, block)


def _blockwise(q_BTNK, keys, expand, v_mean_BNO, out_dtype, q_idx_BT, k_idx_BS, q_seg_BT,
               k_seg_BS, block):
  """The loops of blockwise_attention over key arrays `keys` (each [B, S, ...]) that
  expand(*key blocks) turns into one key block's (k [B,S,N,K], v [B,S,N,O])."""
  B, T, N, _ = q_BTNK.shape
  S, O = keys[0].shape[1], v_mean_BNO.shape[-1]
  bt, bs = min(block, T), min(block, S)
  I, J = -(-T // bt), -(-S // bs)
  i32 = jnp.int32
  if (q_seg_BT is None) != (k_seg_BS is None):
    raise ValueError("give segment ids for both queries and keys, or for neither")
  if q_seg_BT is None:  # no documents: one segment for all
    q_seg_BT, k_seg_BS = jnp.zeros((B, T), i32), jnp.zeros((B, S), i32)
  # Padded keys get an index no query reaches (never visible); padded queries one that
  # reaches no key (their rows are dropped). Real indices must lie strictly between.
  lo, hi = jnp.iinfo(i32).min, jnp.iinfo(i32).max
  q_IBTNK = _pinned(_blocks(q_BTNK, I, bt))
  q_idx_IBT = _blocks(q_idx_BT.astype(i32), I, bt, lo)
  q_seg_IBT = _blocks(q_seg_BT.astype(i32), I, bt)
  keys_J = tuple(_pinned(_blocks(x, J, bs)) for x in keys)
  k_idx_JBS = _blocks(k_idx_BS.astype(i32), J, bs, hi)
  k_seg_JBS = _blocks(k_seg_BS.astype(i32), J, bs)
  # A (query, key) block pair is live when some row has a causally visible pair in it;
  # one reduction over B, outside the loops (under data parallelism: one all-reduce).
  live_IJ = jnp.any(q_idx_IBT.max(-1)[:, None] >= k_idx_JBS.min(-1)[None], axis=-1)
  query_block = _query_block_fn(expand, v_mean_BNO, out_dtype, (B, N, bt, O))
  o_IBNTO = lax.map(
      lambda xs: query_block(*xs, keys_J, k_idx_JBS, k_seg_JBS),
      (q_IBTNK, q_idx_IBT, q_seg_IBT, live_IJ))
  o_BTNO = jnp.transpose(o_IBNTO, (1, 0, 3, 2, 4)).reshape(B, I * bt, N, O)
  return o_BTNO[:, :T]


def _blocks(x, n, size, fill=0):
  """[B, n*size, ...] -> [n, B, size, ...], padding the sequence dim with `fill`."""
  pad = [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad, constant_values=fill)
  return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _pinned(x_JBS):
  """Blocks stay split like the activations they come from (batch over the batch axes,
  heads over "tensor"): a loop that slices a block must never find the block dim
  sharded, or every iteration would all-gather all of K and V."""
  axes = (None, "batch", None, "heads", None) if x_JBS.ndim == 5 else (
      (None, "batch", None) + (None,) * (x_JBS.ndim - 3))
  return constrain(x_JBS, axes)


def _query_block_fn(expand, v_mean_BNO, out_dtype, shape_BNTO):
  """query_block(q, q_idx, q_seg, live_J, keys_J, k_idx_JBS, k_seg_JBS): one query
  block's attention, a scan over the key blocks (those not live skipped)."""
  B, N, bt, O = shape_BNTO
  f32 = jnp.float32

  @jax.checkpoint
  def query_block(q_BTNK, q_idx_BT, q_seg_BT, live_J, keys_J, k_idx_JBS, k_seg_JBS):
    # Rematerialised: the scan's backward then keeps each key step's carry and inputs,
    # not its [B, N, T, S] scores and probabilities (at 32K, 64 key blocks of those were
    # 4 GiB a layer in float32) nor an expanded key block.
    @jax.checkpoint
    def key_block(carry, xs):
      key_blocks, k_idx_BS, k_seg_BS, live = xs

      def update(carry):
        k_BSNK, v_BSNO = expand(*key_blocks)
        return _online_softmax_step(carry, q_BTNK, q_idx_BT, q_seg_BT, k_BSNK, v_BSNO,
                                    k_idx_BS, k_seg_BS)

      return lax.cond(live, update, lambda c: c, carry), None

    init = (jnp.full((B, N, bt), NEG_INF, f32), jnp.zeros((B, N, bt), f32),
            jnp.zeros((B, N, bt, O), f32))
    (m_BNT, l_BNT, acc_BNTO), _ = lax.scan(
        key_block, init, (keys_J, k_idx_JBS, k_seg_JBS, live_J))
    # m still NEG_INF: no visible key. Such a row got exp(0) per masked key of the blocks
    # run but none of those skipped, so its uniform average is taken here instead.
    empty_BNT = m_BNT == NEG_INF
    o_BNTO = acc_BNTO / jnp.where(empty_BNT, 1.0, l_BNT)[..., None]
    o_BNTO = jnp.where(empty_BNT[..., None], v_mean_BNO[:, :, None], o_BNTO)
    return o_BNTO.astype(out_dtype)

  return query_block


def _online_softmax_step(carry, q_BTNK, q_idx_BT, q_seg_BT, k_BSNK, v_BSNO, k_idx_BS,
                         k_seg_BS):
  """One key block into the running (max, sum, weighted values) of a query block's rows,
  the causal and document mask applied."""
  m_BNT, l_BNT, acc_BNTO = carry
  f32 = jnp.float32
  s_BNTS = jnp.einsum("BTNK,BSNK->BNTS", q_BTNK, k_BSNK, preferred_element_type=f32)
  mask_BTS = ((q_idx_BT[:, :, None] >= k_idx_BS[:, None, :])
              & (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]))
  s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, NEG_INF)
  # The running max only shifts exponents (it cancels in acc / l): no gradient, so
  # the backward keeps no argmax mask. Starting at NEG_INF, masked scores give
  # exp(0) = 1 until a real key arrives, whose exp(NEG_INF - m) = 0 then clears them.
  m_new = jnp.maximum(m_BNT, lax.stop_gradient(s_BNTS.max(axis=-1)))
  p_BNTS = jnp.exp(s_BNTS - m_new[..., None])
  alpha_BNT = jnp.exp(m_BNT - m_new)
  pv_BNTO = jnp.einsum("BNTS,BSNO->BNTO", p_BNTS.astype(v_BSNO.dtype), v_BSNO,
                       preferred_element_type=f32)
  return (m_new, alpha_BNT * l_BNT + p_BNTS.sum(axis=-1),
          alpha_BNT[..., None] * acc_BNTO + pv_BNTO)


def up_project(c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO, batched_weights: bool = False):
  """(k [B,S,N,K], v [B,S,N,O]) from the latent: k = [c_kv W_UK | k_R broadcast to every
  head] (one score product over K = H + P), v = c_kv W_UV.

  batched_weights: W_UK and W_UV broadcast over the batch, a product with a batch dim,
  which the "dots_no_batch" remat policy does not save. Under context parallelism the
  alternative kept K and V of the whole gathered sequence for the backward of every
  layer (58 GiB a chip for the 671B at 32K)."""
  B, S, _ = c_kv_BSR.shape
  if batched_weights:
    k_nope_BSNH = jnp.einsum("BSR,BRNH->BSNH", c_kv_BSR,
                             jnp.broadcast_to(w_uk_RNH, (B,) + w_uk_RNH.shape))
    v_BSNO = jnp.einsum("BSR,BRNO->BSNO", c_kv_BSR,
                        jnp.broadcast_to(w_uv_RNO, (B,) + w_uv_RNO.shape))
  else:
    k_nope_BSNH = linear(c_kv_BSR, w_uk_RNH)
    v_BSNO = linear(c_kv_BSR, w_uv_RNO)
  N = k_nope_BSNH.shape[2]
  k_rope_BSNP = jnp.broadcast_to(k_rope_BSP[:, :, None, :], (B, S, N, k_rope_BSP.shape[-1]))
  return jnp.concatenate([k_nope_BSNH, k_rope_BSNP.astype(k_nope_BSNH.dtype)], axis=-1), v_BSNO


def expand_kv(q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO, scale,
              batched_weights: bool = False):
  """q [B,T,N,K] (times `scale`), k [B,S,N,K] and v [B,S,N,O] from the latent c_kv
  (up_project)."""
  k_BSNK, v_BSNO = up_project(c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO, batched_weights)
  # The softmax scale goes on the query ([B,T,N,K]) rather than on the scores.
  q_BTNK = jnp.concatenate([q_nope_BTNH, q_rope_BTNP], axis=-1) * scale
  return q_BTNK, k_BSNK, v_BSNO


def attend_plain(q_BTNK, k_BSNK, v_BSNO, mask_B1TS):
  """softmax(q . k + mask) . v [B,T,N,O] in one piece, q already scaled."""
  # Head-major operands: the batched products then run over leading [B, N] dims.
  q_BNTK = q_BTNK.transpose(0, 2, 1, 3)
  k_BNSK = k_BSNK.transpose(0, 2, 1, 3)
  v_BNSO = v_BSNO.transpose(0, 2, 1, 3)
  scores = jnp.einsum("BNTK,BNSK->BNTS", q_BNTK, k_BNSK, preferred_element_type=jnp.float32)
  probs = masked_softmax(scores, mask_B1TS).astype(v_BSNO.dtype)
  return jnp.einsum("BNTS,BNSO->BNTO", probs, v_BNSO).transpose(0, 2, 1, 3)


def masked_softmax(scores_BNTS, mask_B1TS):
  """softmax over S of float32 scores with the [B,1,T,S] mask."""
  # The mask as an additive bias (0 or NEG_INF, [B,1,T,S], broadcast over heads) rather
  # than a select on the scores: XLA:CPU fuses the add into the score product, the
  # select it did not (attention core fwd+bwd 77 -> 52 ms at the bench's shapes). Same
  # values: s + NEG_INF rounds to NEG_INF in float32 for any score |s| < 1e22.
  bias_B1TS = jnp.where(mask_B1TS, 0.0, NEG_INF).astype(jnp.float32)
  return jax.nn.softmax(scores_BNTS.astype(jnp.float32) + bias_B1TS, axis=-1)


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
      q_nope = linear(x, self._w(self.w_q_nope))   # [B,T,N,H]
      q_rope = linear(x, self._w(self.w_q_rope))   # [B,T,N,P]
    else:
      c_BTQ = self.q_norm(linear(x, self._w(self.w_dq)))
      q_nope = linear(c_BTQ, self._w(self.w_uq))   # [B,T,N,H]
      q_rope = linear(c_BTQ, self._w(self.w_qr))   # [B,T,N,P]
    return q_nope, apply_rope(q_rope, pos_BT, self.cfg)

  def latents(self, x_BTD, pos_BT):
    """What a KV cache holds: (normalised c_kv [B,T,R], roped shared key k_R [B,T,P])."""
    x = x_BTD.astype(self.cfg.jnp_dtype)
    c_kv = self.kv_norm(linear(x, self._w(self.w_dkv)))                      # [B,T,R]
    k_rope = apply_rope(linear(x, self._w(self.w_kr)), pos_BT, self.cfg)    # [B,T,P]
    return c_kv, k_rope

  def expand(self, q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP):
    """q [B,T,N,K] (scaled), k [B,S,N,K] and v [B,S,N,O]: K and V re-expanded from c_kv."""
    return expand_kv(q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP, self._w(self.w_uk),
                     self._w(self.w_uv), softmax_scale(self.cfg))

  def attend_expanded(self, q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP, mask_B1TS):
    """Attention with K and V re-expanded from the latent (training and naive decode)."""
    q_BTNK, k_BSNK, v_BSNO = self.expand(q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP)
    return self.output(attend_plain(q_BTNK, k_BSNK, v_BSNO, mask_B1TS))

  def output(self, o_BTNO):
    """W_O over heads and head dims: [B,T,N,O] -> [B,T,D]."""
    # Pinned like the queries it comes from: left free, the SPMD partitioner gathered
    # the sequence for W_O's weight gradient under context parallelism.
    o_BTNO = constrain(o_BTNO, ("batch", "length", "heads", None))
    return linear(o_BTNO, self._w(self.w_o), n_in=2)

  def _softmax(self, scores_BNTS, mask_B1TS):
    return masked_softmax(scores_BNTS * softmax_scale(self.cfg), mask_B1TS)

  def __call__(self, x_BTD, pos_BT, segment_ids_BT=None):
    q_nope, q_rope = self.queries(x_BTD, pos_BT)
    c_kv, k_rope = self.latents(x_BTD, pos_BT)
    if context_parallel.context_size() > 1:
      return self.output(context_parallel.gather_latent_attention(
          self._core, q_nope, q_rope, c_kv, k_rope, self._w(self.w_uk), self._w(self.w_uv),
          segment_ids_BT, platform=target_platform()))
    if self.cfg.attention_impl in fused_attention.LIBRARIES:
      q_BTNK, k_BSNK, v_BSNO = self.expand(q_nope, q_rope, c_kv, k_rope)
      return self.output(fused_attention.fused_attention(
          q_BTNK, k_BSNK, v_BSNO, segment_ids_BT, library=self.cfg.attention_impl))
    idx_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
    return self.output(self._core(q_nope, q_rope, c_kv, k_rope, self._w(self.w_uk),
                                  self._w(self.w_uv), idx_BT, idx_BT, segment_ids_BT,
                                  segment_ids_BT))

  def _core(self, q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO,
            q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None):
    """Training attention from queries and latents to o [B,T,N,O], "plain",
    "blockwise" or "blockwise_latent", causal on the token indices given (global ones
    under context parallelism)."""
    if self.cfg.attention_impl == "blockwise_latent":
      q_BTNK = jnp.concatenate([q_nope_BTNH, q_rope_BTNP], axis=-1) * softmax_scale(self.cfg)
      return blockwise_latent_attention(q_BTNK, c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO,
                                        q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS,
                                        block=self.cfg.attention_block)
    q_BTNK, k_BSNK, v_BSNO = expand_kv(
        q_nope_BTNH, q_rope_BTNP, c_kv_BSR, k_rope_BSP, w_uk_RNH, w_uv_RNO,
        softmax_scale(self.cfg), batched_weights=context_parallel.context_size() > 1)
    if self.cfg.attention_impl == "blockwise":
      return blockwise_attention(q_BTNK, k_BSNK, v_BSNO, q_idx_BT, k_idx_BS, q_seg_BT,
                                 k_seg_BS, block=self.cfg.attention_block)
    return attend_plain(q_BTNK, k_BSNK, v_BSNO,
                        attention_mask(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS))

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
    return self.output(o_BTNO)

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
