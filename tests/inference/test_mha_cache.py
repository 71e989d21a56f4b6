"""The MHA counterfactual cache (inference/mha_cache.py): the same model with per-head K
and V cached instead of the latent gives the latent-cached decode's logits."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.inference import mha_cache
from deepseek_jax.model import config, kv_cache
from deepseek_jax.model.transformer import Transformer

from test_decoding import _variables

TINY = config.tiny().replace(n_layers=3, mtp_depth=0)   # dense, MoE, MoE; float32


def test_mha_cache_holds_per_head_kv():
  c = mha_cache.create(TINY, TINY.n_layers, 2, 16)
  N, K, O = TINY.n_heads, TINY.qk_head_dim, TINY.v_head_dim
  assert c.k.shape == (3, 2, N, 16, K) and c.v.shape == (3, 2, N, 16, O)
  assert c.values_per_token == 3 * N * (K + O)
  # V3's heads: 61 x 128 x (192 + 128) values, 4,997,120 bytes a token in bfloat16.
  v3 = config.ModelConfig(n_layers=61, n_heads=128, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128)
  shape = jax.eval_shape(lambda: mha_cache.create(v3, 61, 1, 1, jnp.bfloat16))
  assert (shape.k.size + shape.v.size) * 2 == 4_997_120


def test_mha_cached_decode_equals_latent_cached_decode():
  """A ragged prompt chunk, then five greedy steps: the MHA-cached logits equal the
  absorbed latent-cached logits at every step (float32)."""
  v = _variables(TINY)
  model = Transformer(TINY)
  mla = jax.jit(lambda v, t, c, n: model.apply(v, t, c, n, method=Transformer.extend))
  mha = jax.jit(lambda v, t, c, n: model.apply(v, t, c, n, method=mha_cache.extend))
  B, T, max_len = 3, 6, 16
  prompt = np.random.default_rng(1).integers(0, TINY.vocab_size, (B, T)).astype(np.int32)
  n_B = jnp.array([6, 3, 5], jnp.int32)
  c_mla = kv_cache.create(TINY, TINY.n_layers, B, max_len)
  c_mha = mha_cache.create(TINY, TINY.n_layers, B, max_len)
  out_a, c_mla = mla(v, prompt, c_mla, n_B)
  out_b, c_mha = mha(v, prompt, c_mha, n_B)
  worst = 0.0
  for step in range(6):
    a, b = np.asarray(out_a.logits), np.asarray(out_b.logits)
    if step == 0:   # the prompt: only its real tokens
      keep = np.arange(T)[None, :] < np.asarray(n_B)[:, None]
      a, b = a[keep], b[keep]
    worst = max(worst, float(np.abs(a - b).max()))
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5, err_msg=f"step {step}")
    last = (np.asarray(c_mla.lengths) - 1) if step == 0 else np.zeros(B, int)
    nxt = np.asarray(out_a.logits)[np.arange(B), last].argmax(-1)
    tokens = jnp.asarray(nxt[:, None].astype(np.int32))
    ones = jnp.ones((B,), jnp.int32)
    out_a, c_mla = mla(v, tokens, c_mla, ones)
    out_b, c_mha = mha(v, tokens, c_mha, ones)
  np.testing.assert_array_equal(c_mha.lengths, c_mla.lengths)
  assert int(c_mha.lengths[1]) == 3 + 6 and worst < 2e-5, worst
