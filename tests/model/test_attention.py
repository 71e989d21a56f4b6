"""Multi-head latent attention against naive numpy loops, and its masking properties."""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax.model import config
from deepseek_jax.model.attention import MLA

B, T = 2, 7

CFGS = {
    "qlora": config.tiny(),
    "qlora_yarn": config.tiny().replace(rope_factor=4.0, rope_original_max_len=16),
    "plain_q": config.tiny().replace(q_lora_rank=None),
    "plain_q_yarn": config.tiny_yarn(),  # also mscale != mscale_all_dim
    # The latent norms keep DeepSeek's eps 1e-6 whatever rms_eps says.
    "qlora_big_eps": config.tiny().replace(rms_eps=0.5),
}


def _params(cfg, seed=0):
  x = jnp.zeros((1, 4, cfg.d_model), jnp.float32)
  pos = jnp.zeros((1, 4), jnp.int32)
  # Shapes only (eval_shape): an eager init costs seconds of op-by-op compiles.
  shapes = jax.eval_shape(MLA(cfg).init, jax.random.PRNGKey(seed), x, pos)
  params = nn.unbox(shapes)["params"]
  return jax.tree.map(jnp.asarray, ref.randomize(params, seed))


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(lambda p, x, pos, seg: MLA(cfg).apply({"params": p}, x, pos, seg))


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)
  pos = np.stack([np.arange(T) + 3, np.arange(T) * 2]).astype(np.int32)  # not 0..T-1
  return x, pos


@pytest.mark.parametrize("name", sorted(CFGS))
def test_mla_matches_numpy(name):
  cfg = CFGS[name]
  assert cfg.v_head_dim != cfg.qk_nope_head_dim
  p = _params(cfg)
  x, pos = _inputs(cfg)
  got = np.asarray(_apply(cfg)(p, x, pos, None))
  expected = ref.mla(jax.tree.map(np.asarray, p), x, pos, cfg)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qlora", "plain_q_yarn"])
def test_mla_with_segments_matches_numpy(name):
  cfg = CFGS[name]
  p = _params(cfg, seed=1)
  x, pos = _inputs(cfg, seed=1)
  seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 3, 3, 3]], np.int32)
  got = np.asarray(_apply(cfg)(p, x, pos, seg))
  expected = ref.mla(jax.tree.map(np.asarray, p), x, pos, cfg, seg)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qlora", "plain_q_yarn"])
def test_mla_is_causal(name):
  cfg = CFGS[name]
  p = _params(cfg, seed=2)
  x, pos = _inputs(cfg, seed=2)
  base = np.asarray(_apply(cfg)(p, x, pos, None))
  for t in range(T - 1):
    x2 = x.copy()
    x2[:, t + 1:] = np.random.default_rng(t).standard_normal(x2[:, t + 1:].shape)
    out = np.asarray(_apply(cfg)(p, x2, pos, None))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
    assert np.abs(out[:, t + 1:] - base[:, t + 1:]).min() > 1e-4


def test_segments_block_attention_across_documents():
  cfg = CFGS["qlora"]
  p = _params(cfg, seed=3)
  rng = np.random.default_rng(3)
  doc1 = rng.standard_normal((1, 3, cfg.d_model)).astype(np.float32)
  doc2 = rng.standard_normal((1, 4, cfg.d_model)).astype(np.float32)
  packed = np.concatenate([doc1, doc2], 1)
  seg = np.array([[1, 1, 1, 2, 2, 2, 2]], np.int32)
  pos = np.array([[0, 1, 2, 0, 1, 2, 3]], np.int32)
  out = np.asarray(_apply(cfg)(p, packed, pos, seg))
  alone1 = np.asarray(_apply(cfg)(p, doc1, np.arange(3)[None], None))
  alone2 = np.asarray(_apply(cfg)(p, doc2, np.arange(4)[None], None))
  np.testing.assert_allclose(out[:, :3], alone1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 3:], alone2, rtol=1e-5, atol=1e-6)
  # Without segment ids, doc 2 does see doc 1.
  mixed = np.asarray(_apply(cfg)(p, packed, pos, None))
  assert np.abs(mixed[:, 3:] - alone2).max() > 1e-3


def _eqns(jaxpr):
  """Every equation of a jaxpr, descending into sub-jaxprs (pjit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def test_softmax_runs_in_float32_under_bf16():
  cfg32 = CFGS["qlora"]
  cfg16 = cfg32.replace(dtype="bfloat16")
  p = _params(cfg32, seed=4)
  x, pos = _inputs(cfg32, seed=4)
  out16 = _apply(cfg16)(p, jnp.asarray(x, jnp.bfloat16), pos, None)
  out32 = np.asarray(_apply(cfg32)(p, x, pos, None))
  assert out16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert err < 0.03 * np.abs(out32).max(), err

  # The scores [B, N, T, S] are float32 from the score einsum through exp and the sum.
  jaxpr = jax.make_jaxpr(
      lambda p, x: MLA(cfg16).apply({"params": p}, x, pos, None))(
          p, jnp.asarray(x, jnp.bfloat16)).jaxpr
  bnts = (B, cfg16.n_heads, T, T)
  seen, casts = {}, set()
  for eqn in _eqns(jaxpr):
    for var in eqn.outvars:
      aval = var.aval
      if getattr(aval, "shape", None) == bnts:
        seen.setdefault(eqn.primitive.name, set()).add(jnp.dtype(aval.dtype))
        if eqn.primitive.name == "convert_element_type":
          casts.add((jnp.dtype(eqn.invars[0].aval.dtype), jnp.dtype(aval.dtype)))
  assert {"dot_general", "exp"} <= set(seen), seen
  for prim in ("dot_general", "exp", "max", "reduce_max", "reduce_sum", "div", "sub",
               "select_n"):
    if prim in seen:
      assert seen[prim] == {jnp.dtype(jnp.float32)}, (prim, seen)
  # The one downcast of a [B, N, T, S] array: the probabilities, for the value einsum.
  assert casts == {(jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))}, casts
