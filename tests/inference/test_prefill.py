"""Prefill (inference/prefill.py) == Transformer.extend of the prompt into an empty cache:
the same cache contents and the same last-token logits, for every attention impl."""

import jax
import numpy as np
import pytest

from deepseek_jax.inference import prefill
from deepseek_jax.model import config, kv_cache
from deepseek_jax.model.transformer import Transformer
from tests.inference.test_mha_cache import _variables

TINY = config.tiny().replace(n_layers=3, mtp_depth=0)


@pytest.mark.parametrize("impl", ["plain", "blockwise", "blockwise_latent"])
def test_prefill_equals_extend_into_an_empty_cache(impl):
  cfg = TINY.replace(attention_impl=impl, attention_block=4)
  v = _variables(cfg)
  model = Transformer(cfg)
  B, S = 3, 11
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
  n_B = np.array([11, 7, 9], np.int32)
  empty = kv_cache.create(cfg, cfg.n_layers, B, 16)
  ref, c_ref = jax.jit(lambda v, t, c, n: model.apply(
      v, t, c, n, method=Transformer.extend))(v, tokens, empty, n_B)
  out, c = jax.jit(lambda v, t, c, n: model.apply(
      v, t, c, n, method=prefill.prefill))(v, tokens, empty, n_B)
  last = np.asarray(ref.logits)[np.arange(B), n_B - 1]
  assert out.logits.shape == (B, 1, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(out.logits)[:, 0], last, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(c.lengths, n_B)
  for a, b in ((c.c_kv, c_ref.c_kv), (c.k_rope, c_ref.k_rope)):
    for row, n in enumerate(n_B):   # the real tokens' latents (padding's are unread)
      np.testing.assert_allclose(np.asarray(a)[:, row, :n], np.asarray(b)[:, row, :n],
                                 atol=1e-6, rtol=1e-6)
