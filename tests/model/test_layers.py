"""linear (both layouts), RMSNorm and RoPE (with YaRN) against the numpy references."""

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax.model import config, layers

V3 = config.deepseek_v3_671b()


def _rope_cfgs():
  return {
      "plain": config.tiny().replace(qk_rope_head_dim=8),
      "tiny_yarn": config.tiny_yarn(),
      "v3_yarn": V3,
      "yarn_p16": config.tiny().replace(qk_rope_head_dim=16, rope_factor=8.0,
                                        rope_original_max_len=64, beta_fast=16.0,
                                        beta_slow=2.0, rope_theta=500.0),
  }


@pytest.mark.parametrize("flat", [True, False], ids=["flat_2d", "einsum"])
def test_linear_layouts_match_numpy(flat, monkeypatch):
  """Both layouts of linear (flat 2-D on XLA:CPU, einsum elsewhere) are the numpy
  contraction, for one and two contracted dims and an f32 result from bf16 inputs."""
  monkeypatch.setattr(layers, "flat_matmuls", lambda: flat)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  w1 = rng.standard_normal((5, 6, 7)).astype(np.float32)
  w2 = rng.standard_normal((4, 5, 6)).astype(np.float32)
  np.testing.assert_allclose(layers.linear(x, w1), np.einsum("abcd,def->abcef", x, w1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layers.linear(x, w2, n_in=2),
                             np.einsum("abcd,cde->abe", x, w2), rtol=1e-5, atol=1e-5)
  y = layers.linear(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w1, jnp.bfloat16),
                    preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32 and y.shape == (2, 3, 4, 6, 7)
  with pytest.raises(ValueError, match="contracted"):
    layers.linear(x, w2)


def test_linear_layout_follows_the_target_platform():
  """Flat on XLA:CPU, also under a CPU mesh; train/aot.py's TPU meshes take the einsum
  (tests/train/test_aot.py holds that program to its memory budget)."""
  assert layers.target_platform() == jax.default_backend() == "cpu"
  assert layers.flat_matmuls()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  with jax.set_mesh(mesh):
    assert layers.target_platform() == "cpu" and layers.flat_matmuls()


def test_rms_norm_matches_numpy():
  cfg = config.tiny().replace(rms_eps=1e-5)
  x = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32) * 3
  module = layers.RMSNorm(cfg)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), x))
  scale = np.random.default_rng(1).standard_normal(12).astype(np.float32)
  params = {"params": {"scale": scale}}
  y = module.apply(params, x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, ref.rms_norm(x, scale, 1e-5), rtol=1e-5, atol=1e-6)
  # A tiny-norm row: eps matters, and must sit inside the square root.
  x0 = np.full((1, 1, 12), 1e-3, np.float32)
  np.testing.assert_allclose(module.apply(params, x0), ref.rms_norm(x0, scale, 1e-5),
                             rtol=1e-5)
  # An explicit eps overrides the config's.
  y = layers.RMSNorm(cfg, eps=0.5).apply(params, x0)
  np.testing.assert_allclose(y, ref.rms_norm(x0, scale, 0.5), rtol=1e-5)


def test_rms_norm_keeps_bf16():
  cfg = config.tiny()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 8)), jnp.bfloat16)
  params = nn.unbox(layers.RMSNorm(cfg).init(jax.random.PRNGKey(0), x))
  y = layers.RMSNorm(cfg).apply(params, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), ref.rms_norm(x.astype(jnp.float32),
                                                                    np.ones(8), cfg.rms_eps),
                             rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("P,theta", [(4, 10000.0), (8, 10000.0), (64, 10000.0), (16, 500.0)])
def test_inv_freq_without_yarn(P, theta):
  cfg = config.tiny().replace(qk_rope_head_dim=P, rope_theta=theta)
  expected = np.array([1.0 / theta ** (2 * i / P) for i in range(P // 2)])
  got = layers.rope_inv_freq(cfg)
  assert got.shape == (P // 2,)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["tiny_yarn", "v3_yarn", "yarn_p16"])
def test_inv_freq_with_yarn_matches_official_correction(name):
  cfg = _rope_cfgs()[name]
  assert cfg.yarn
  got = layers.rope_inv_freq(cfg)
  expected = ref.inv_freq(cfg)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  plain = np.array([1.0 / cfg.rope_theta ** (2 * i / cfg.qk_rope_head_dim)
                    for i in range(cfg.qk_rope_head_dim // 2)])
  # The highest frequency is always kept, the lowest always interpolated.
  np.testing.assert_allclose(got[0], plain[0], rtol=1e-6)
  np.testing.assert_allclose(got[-1], plain[-1] / cfg.rope_factor, rtol=1e-6)


def test_yarn_v3_ramp_has_all_three_regions():
  # V3 (P=64, s=40, 4096, beta 32/1): dims up to floor(10.47)=10 extrapolate, dims from
  # ceil(22.51)=23 on interpolate, the ones between blend linearly.
  got = layers.rope_inv_freq(V3).astype(np.float64)
  plain = np.array([1.0 / 10000.0 ** (2 * i / 64) for i in range(32)])
  ratio = got / plain
  np.testing.assert_allclose(ratio[:11], 1.0, rtol=1e-6)
  np.testing.assert_allclose(ratio[23:], 1.0 / 40.0, rtol=1e-6)
  i = 16
  ramp = (i - 10) / (23 - 10)
  np.testing.assert_allclose(ratio[i], ramp / 40.0 + (1 - ramp), rtol=1e-6)
  assert np.all(np.diff(ratio) <= 1e-7)


@pytest.mark.parametrize("name", ["plain", "tiny_yarn", "v3_yarn"])
@pytest.mark.parametrize("heads", [(), (3,)])
def test_apply_rope_is_complex_multiplication_of_adjacent_pairs(name, heads):
  cfg = _rope_cfgs()[name]
  P = cfg.qk_rope_head_dim
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 5) + heads + (P,)).astype(np.float32)
  pos = rng.integers(0, 300, size=(2, 5)).astype(np.int32)
  got = layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg)
  assert got.shape == x.shape and got.dtype == jnp.float32
  expected = ref.rope(x, pos, ref.inv_freq(cfg), ref.rope_attention_factor(cfg))
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_apply_rope_pairs_are_adjacent_not_halves():
  # Only dims (0, 1) hold signal: adjacent-pair rotation keeps it in dims 0 and 1.
  cfg = config.tiny().replace(qk_rope_head_dim=8)
  x = np.zeros((1, 1, 8), np.float32)
  x[..., 0] = 1.0
  got = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.array([[3]]), cfg))
  np.testing.assert_allclose(got[0, 0, :2], [math.cos(3.0), math.sin(3.0)], rtol=1e-6)
  np.testing.assert_allclose(got[0, 0, 2:], 0.0, atol=0)


@pytest.mark.parametrize("name", ["plain", "v3_yarn"])
def test_rope_is_a_rotation(name):
  cfg = _rope_cfgs()[name]
  assert layers.rope_attention_factor(cfg) == pytest.approx(1.0)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 6, 2, cfg.qk_rope_head_dim)).astype(np.float32)
  pos = rng.integers(0, 5000, size=(2, 6)).astype(np.int32)
  y = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  assert not np.allclose(y, x)
  pairs_in = np.linalg.norm(x.reshape(x.shape[:-1] + (-1, 2)), axis=-1)
  pairs_out = np.linalg.norm(y.reshape(y.shape[:-1] + (-1, 2)), axis=-1)
  np.testing.assert_allclose(pairs_out, pairs_in, rtol=1e-5)


def test_rope_attention_factor_scales_norms():
  cfg = config.tiny_yarn()  # mscale 0.7 != mscale_all_dim 0.9
  factor = (0.1 * 0.7 * math.log(4.0) + 1) / (0.1 * 0.9 * math.log(4.0) + 1)
  assert layers.rope_attention_factor(cfg) == pytest.approx(factor, rel=1e-12)
  x = np.random.default_rng(4).standard_normal((1, 4, 4)).astype(np.float32)
  y = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.arange(4)[None], cfg))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), factor * np.linalg.norm(x, axis=-1),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["plain", "tiny_yarn", "v3_yarn"])
def test_rope_scores_depend_only_on_position_difference(name):
  cfg = _rope_cfgs()[name]
  P = cfg.qk_rope_head_dim
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((1, 1, P)).astype(np.float32))
  k = jnp.asarray(rng.standard_normal((1, 1, P)).astype(np.float32))

  def score(m, n):
    qr = layers.apply_rope(q, jnp.array([[m]]), cfg)
    kr = layers.apply_rope(k, jnp.array([[n]]), cfg)
    return float(jnp.sum(qr * kr))

  for m, n in [(5, 2), (9, 9), (3, 11)]:
    base = score(m, n)
    for shift in (1, 17, 250):
      assert score(m + shift, n + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
  # ... and it does depend on the difference.
  assert abs(score(5, 2) - score(6, 2)) > 1e-3


def test_softmax_scale():
  cfg = config.tiny()
  assert layers.softmax_scale(cfg) == pytest.approx(1 / math.sqrt(8 + 4), rel=1e-12)
  yarn = config.tiny_yarn()  # mscale_all_dim 0.9 sets the scale (as HF)
  m = 0.1 * 0.9 * math.log(4.0) + 1.0
  assert layers.softmax_scale(yarn) == pytest.approx(m * m / math.sqrt(12), rel=1e-12)
  m3 = 0.1 * math.log(40.0) + 1.0
  assert layers.softmax_scale(V3) == pytest.approx(m3 * m3 / math.sqrt(192), rel=1e-12)
  assert layers.softmax_scale(yarn.replace(rope_factor=1.0)) == pytest.approx(
      1 / math.sqrt(12), rel=1e-12)
