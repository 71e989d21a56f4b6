"""Prefill: a whole prompt of S tokens a request run into an EMPTY latent cache.

It is Transformer.extend of the prompt at positions 0 .. S-1 (the cache's latents and the
last token's logits are the same: tests/inference/test_prefill.py), computed the way
training computes attention rather than the way decode does. extend attends the chunk
over the cache in one [B, N, T, S] score array (absorbed or expanded), which at 32K
positions is 512 GiB a request in float32 for V3's 128 heads; on an empty cache the keys
are exactly the chunk's own, so the model's training attention (MLA._core: "blockwise"
online softmax, "blockwise_latent", or "plain" for small tests, per cfg.attention_impl)
gives the same answer without ever holding the scores. Each layer writes its latents
into the cache as it goes; only the last real token's logits are computed (what the
first decode step needs; [B, S, V] float32 logits would be 16 GiB a 32K request).
"""

from __future__ import annotations

import jax.numpy as jnp

from deepseek_jax.model.kv_cache import KVCache
from deepseek_jax.model.transformer import DecodeOutput


def prefill(model, tokens_BS, cache: KVCache, n_new_B=None):
  """Call as `Transformer(cfg).apply(variables, tokens, cache, method=prefill)` with an
  empty cache (lengths 0). n_new_B [B] of the S tokens are real (default all), the rest
  right padding. Returns (DecodeOutput of each row's last real token, [B, 1, ...];
  cache with the prompts written and lengths n_new_B)."""
  cfg = model.cfg
  if cfg.scan_layers:
    raise ValueError("prefill runs the unrolled layout (scan_layers=False)")
  B, S = tokens_BS.shape
  if n_new_B is None:
    n_new_B = jnp.full((B,), S, jnp.int32)
  pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  valid_BS = pos_BS < n_new_B[:, None]
  x_BSD = model.embed_tokens(tokens_BS)
  for i, block in enumerate(model.blocks):
    attn = block.attn
    h_BSD = block.attn_norm(x_BSD)
    q_nope_BSNH, q_rope_BSNP = attn.queries(h_BSD, pos_BS)
    c_kv_BSR, k_rope_BSP = attn.latents(h_BSD, pos_BS)
    cache = cache.write(i, c_kv_BSR, k_rope_BSP)
    # Causal over the chunk's own keys: the cache held nothing before it. Padding keys
    # sit after every real query, so causality already hides them.
    o_BSNO = attn._core(q_nope_BSNH, q_rope_BSNP, c_kv_BSR, k_rope_BSP,
                        attn._w(attn.w_uk), attn._w(attn.w_uv), pos_BS, pos_BS)
    bias_E = model._bias(i - cfg.first_k_dense) if cfg.is_moe_layer(i) else None
    x_BSD, _ = block._ffn(x_BSD + attn.output(o_BSNO), valid_BS, bias_E)
  last_B1D = jnp.take_along_axis(x_BSD, (n_new_B - 1)[:, None, None], axis=1)
  normed_B1D = model.final_norm(last_B1D)
  out = DecodeOutput(logits=model.logits(normed_B1D),
                     hidden=normed_B1D if cfg.mtp_feed_normed else last_B1D)
  return out, cache.with_lengths(n_new_B)
