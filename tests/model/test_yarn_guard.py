"""YaRN guarded (issue 34, item 4): our rotary tables and softmax scale against Hugging
Face's DeepseekV3 in float64, and no sequence length that switches YaRN on or off.

What is compared, and where each side comes from:

* Ours: layers.rope_inv_freq, rope_attention_factor, softmax_scale and apply_rope, the
  functions MLA calls (attention.py). rope_inv_freq computes in float64 numpy and rounds
  to float32 on return; to see its formula at float64 we run it with the module's `np`
  swapped for a numpy whose `float32` is float64 (_ours_inv_freq_fp64), so the very same
  code runs, minus that last rounding.
* Hugging Face: transformers' DeepseekV3RotaryEmbedding (which picks rope_type "yarn"
  from the config and calls modeling_rope_utils._compute_yarn_parameters) and
  DeepseekV3Attention.scaling (yarn_apply_mscale). _compute_yarn_parameters hard-codes
  torch.float32 (`dtype=torch.float`, `dtype=torch.float32`); the float64 reference runs
  it with that module's `torch` swapped for one whose float/float32 are float64
  (_hf_rotary_fp64), so again HF's own code runs, in float64.

Positions: 0, 4095 and 4096 (either side of V3's original 4K context), 32767, 131071 and
163839 (the last position of V3's 160K = 40 x 4K context).
"""

import inspect

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax.model import config, layers
from deepseek_jax.model.attention import MLA

POSITIONS = (0, 4095, 4096, 32767, 131071, 163839)
EPS32 = 2.0 ** -24   # float32 unit roundoff (half an ulp, relative)
EPS64 = 2.0 ** -53   # float64 unit roundoff


def _cfgs():
  v3 = config.deepseek_v3_671b()
  return {
      "v3_671b": v3,                                  # mscale = mscale_all_dim = 1
      "v2_lite": config.deepseek_v2_lite(),           # mscale = mscale_all_dim = 0.707
      # The attention factor on cos/sin is 1 in both presets; these two make it not:
      "v3_mscales_differ": v3.replace(mscale=0.7, mscale_all_dim=0.9),
      "v3_no_mscale_all_dim": v3.replace(mscale=1.0, mscale_all_dim=0.0),
  }


def test_presets_are_the_released_rope_settings():
  """The two presets the parity tests stand on carry the released YaRN settings (V3's
  and V2-Lite's config.json): theta 1e4, P 64, H 128, factor 40 over 4096, betas 32/1,
  mscales 1 (V3) and 0.707 (V2-Lite)."""
  for cfg, m in ((config.deepseek_v3_671b(), 1.0), (config.deepseek_v2_lite(), 0.707)):
    assert (cfg.rope_theta, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim) == (1e4, 64, 128)
    assert (cfg.rope_factor, cfg.rope_original_max_len) == (40.0, 4096)
    assert (cfg.beta_fast, cfg.beta_slow, cfg.mscale, cfg.mscale_all_dim) == (32, 1, m, m)
    assert cfg.yarn


# Hugging Face side ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
  why = "HF parity tests need the parity extra: pip install -e '.[parity]'"
  torch = pytest.importorskip("torch", reason=why)
  pytest.importorskip("transformers", reason=why)
  from transformers import modeling_rope_utils
  from transformers.models.deepseek_v3 import modeling_deepseek_v3
  return torch, modeling_rope_utils, modeling_deepseek_v3


def _hf_config(cfg):
  """A small DeepseekV3Config with cfg's attention head dims and rope settings, written
  out by hand (not through deepseek_jax.hf, which test_hf.py covers)."""
  import transformers
  if cfg.yarn:
    rope = dict(rope_type="yarn", rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
                beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                mscale_all_dim=cfg.mscale_all_dim)
    max_pos = int(round(cfg.rope_original_max_len * cfg.rope_factor))
  else:
    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
    max_pos = cfg.rope_original_max_len
  return transformers.DeepseekV3Config(
      vocab_size=16, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32,
      kv_lora_rank=32, qk_nope_head_dim=cfg.qk_nope_head_dim,
      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=16, n_routed_experts=8, n_group=1,
      topk_group=1, num_experts_per_tok=2, max_position_embeddings=max_pos,
      rope_parameters=rope)


def _hf_rotary_fp64(hf, cfg, monkeypatch):
  """(inv_freq float64 [P/2], attention_scaling): HF's DeepseekV3RotaryEmbedding built
  with _compute_yarn_parameters running in float64."""
  torch, rope_utils, _ = hf

  class Torch64:
    float = float32 = torch.float64

    def __getattr__(self, name):
      return getattr(torch, name)

  with monkeypatch.context() as m:
    m.setattr(rope_utils, "torch", Torch64())
    rotary = hf[2].DeepseekV3RotaryEmbedding(_hf_config(cfg))
  assert rotary.inv_freq.dtype == torch.float64 or not cfg.yarn
  return rotary.inv_freq.double().numpy(), float(rotary.attention_scaling)


def _ours_inv_freq_fp64(cfg, monkeypatch):
  """rope_inv_freq's own float64 arithmetic, without its final rounding to float32."""

  class Numpy64:
    float32 = np.float64

    def __getattr__(self, name):
      return getattr(np, name)

  with monkeypatch.context() as m:
    m.setattr(layers, "np", Numpy64())
    inv = layers.rope_inv_freq(cfg)
  assert inv.dtype == np.float64
  return inv


def _tables(inv_freq, factor):
  """cos and sin [positions, P/2] in float64, times the attention factor: what
  apply_rope multiplies each adjacent pair by (and HF's cos/sin, whose two halves repeat
  these columns)."""
  angle = np.asarray(POSITIONS, np.float64)[:, None] * inv_freq
  return np.cos(angle) * factor, np.sin(angle) * factor


def _fp32_rope_bound(x, positions, inv_freq32, factor):
  """Per-pair bound [B, T, ..., P/2] on |apply_rope(x) - exact rotation| for float32 x,
  (test_apply_rope_fp32_matches_hf_fp64_rotation's docstring derives it):
  factor * |x_j| * (2 * p * inv_freq_j + 8) * 2^-24."""
  x = np.asarray(x, np.float64)
  norm = np.hypot(x[..., 0::2], x[..., 1::2])
  p = np.asarray(positions, np.float64).reshape(positions.shape + (1,) * (x.ndim - 2))
  return factor * norm * (2 * p * np.asarray(inv_freq32, np.float64) + 8) * EPS32


# 1. Parity with Hugging Face ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(_cfgs()))
def test_yarn_tables_match_hf_in_fp64(name, hf, monkeypatch):
  """inv_freq, the attention factor and the cos/sin tables equal HF's in float64.

  inv_freq and the factor: 1e-12 relative (measured: 2.7e-16, i.e. one float64 ulp;
  the factor is exact). The tables: a relative inv_freq difference r moves the angle at
  position p by p * inv_freq * r, so they get 1e-12 + factor * p * inv_freq * 8 * 2^-53
  (measured at 163839: 2e-12 cos, 4e-12 sin). The float32 inv_freq that apply_rope
  really uses must be HF's float64 one correctly rounded (within 2^-24 relative; it is
  bit-identical to float32(HF float64) today, while HF's own float32 arithmetic is
  off by up to 2.1 x 2^-24)."""
  cfg = _cfgs()[name]
  hf_inv, hf_factor = _hf_rotary_fp64(hf, cfg, monkeypatch)
  ours_inv = _ours_inv_freq_fp64(cfg, monkeypatch)
  ours_factor = layers.rope_attention_factor(cfg)

  inv_err = np.max(np.abs(ours_inv - hf_inv) / hf_inv)
  print(f"{name}: inv_freq rel err {inv_err:.2e}, factor ours {ours_factor!r} "
        f"HF {hf_factor!r}")
  assert inv_err <= 1e-12
  assert ours_factor == pytest.approx(hf_factor, rel=1e-12, abs=0)

  shipped = layers.rope_inv_freq(cfg)
  assert shipped.dtype == np.float32
  rounding = np.max(np.abs(shipped.astype(np.float64) - hf_inv) / hf_inv)
  print(f"{name}: float32 inv_freq rel err {rounding / EPS32:.3f} x 2^-24")
  assert rounding <= EPS32

  ours_cos, ours_sin = _tables(ours_inv, ours_factor)
  hf_cos, hf_sin = _tables(hf_inv, hf_factor)
  tol = 1e-12 + hf_factor * np.asarray(POSITIONS)[:, None] * hf_inv * 8 * EPS64
  for what, a, b in (("cos", ours_cos, hf_cos), ("sin", ours_sin, hf_sin)):
    err = np.abs(a - b)
    print(f"{name}: {what} table max err {err.max():.2e}, "
          f"max err/tol {np.max(err / tol):.2f}")
    assert np.all(err <= tol), what


@pytest.mark.parametrize("name", sorted(_cfgs()))
def test_apply_rope_fp32_matches_hf_fp64_rotation(name, hf, monkeypatch):
  """Our jax apply_rope (float32 throughout) rotates a fixed random vector as HF's
  apply_rotary_pos_emb_interleave does in float64 with HF's float64 tables.

  HF's interleaved rotation returns the rotated pairs de-interleaved ([evens | odds]);
  ours keeps them adjacent, so ours is compared as [y[0::2] | y[1::2]] (the same
  permutation for q and k: scores are equal).

  Tolerance, per pair j at position p, of norm |x_j| and attention factor a: float32
  gives the angle p * inv_freq two roundings (inv_freq to float32, then the product; the
  position itself is exact below 2^24), each at most p * inv_freq * 2^-24, and an angle
  error d moves the rotated pair by at most a * |x_j| * d; cos and sin (XLA's float32
  cos/sin measured within 0.55 ulp up to 2e5 rad), the factor, the two multiplies and
  the add cost a few more ulps, taken as 8 * 2^-24 * a * |x_j|. So
  |err_j| <= a * |x_j| * (2 * p * inv_freq_j + 8) * 2^-24. At p = 163839 this is about
  0.015 * |x_j| for the fast pairs: float32 RoPE cannot place position 163839 better
  (measured max error there 0.011, 0.56 of the bound; HF's own float32 path has the
  same max error against this reference, 0.011)."""
  torch, _, modeling = hf
  cfg = _cfgs()[name]
  P = cfg.qk_rope_head_dim
  hf_inv, hf_factor = _hf_rotary_fp64(hf, cfg, monkeypatch)
  x = np.random.default_rng(0).standard_normal((1, len(POSITIONS), 2, P)).astype(np.float32)
  pos = np.asarray(POSITIONS, np.int32)[None]

  y = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg), np.float64)
  y = np.concatenate([y[..., 0::2], y[..., 1::2]], axis=-1)

  angle = torch.tensor(pos[0].astype(np.float64)[:, None] * hf_inv)[None]   # [1, T, P/2]
  emb = torch.cat((angle, angle), dim=-1)                  # as DeepseekV3RotaryEmbedding
  cos, sin = emb.cos() * hf_factor, emb.sin() * hf_factor
  xt = torch.tensor(x.astype(np.float64)).transpose(1, 2)  # [B, N, T, P]
  expected, _ = modeling.apply_rotary_pos_emb_interleave(xt, xt, cos, sin)
  expected = expected.transpose(1, 2).numpy()

  err = np.abs(y - expected)
  err_pair = np.maximum(err[..., :P // 2], err[..., P // 2:])             # [1, T, 2, P/2]
  bound = _fp32_rope_bound(x, pos, layers.rope_inv_freq(cfg), hf_factor)
  by_pos = ", ".join(f"{p}: {e:.2e}" for p, e in zip(POSITIONS, err.max(axis=(0, 2, 3))))
  print(f"{name}: apply_rope max err by position {{{by_pos}}}, "
        f"max err/bound {np.max(err_pair / bound):.2f}")
  assert np.all(err_pair <= bound)


@pytest.mark.parametrize("name", sorted(_cfgs()) + ["v3_no_yarn"])
def test_softmax_scale_matches_hf(name, hf):
  """softmax_scale equals DeepseekV3Attention.scaling: 1/sqrt(H + P) times
  mscale(40, mscale_all_dim)^2 under YaRN (1/sqrt(192) * 1.3689^2 = 0.13523 for V3,
  * 1.2608^2 = 0.11472 for V2-Lite), plain 1/sqrt(192) without it or when
  mscale_all_dim is 0 (measured difference: 0 or 1 float64 ulp)."""
  _, _, modeling = hf
  cfg = (config.deepseek_v3_671b().replace(rope_factor=1.0) if name == "v3_no_yarn"
         else _cfgs()[name])
  hf_scale = modeling.DeepseekV3Attention(_hf_config(cfg), layer_idx=0).scaling
  ours = layers.softmax_scale(cfg)
  print(f"{name}: softmax scale ours {ours!r} HF {hf_scale!r}")
  assert ours == pytest.approx(hf_scale, rel=4 * EPS64, abs=0)


def test_no_yarn_is_plain_rope_and_plain_scale(hf, monkeypatch):
  """rope_factor 1 switches YaRN off whatever the other YaRN fields say: inv_freq is
  theta^(-2i/P) (HF's "default" rope type), the attention factor 1 and the softmax
  scale exactly 1/sqrt(H + P); apply_rope is then a plain rotation by p * theta^(-2i/P).
  """
  cfg = config.deepseek_v3_671b().replace(rope_factor=1.0)   # betas, mscales kept: V3's
  assert not cfg.yarn
  P = cfg.qk_rope_head_dim
  plain = 1.0 / cfg.rope_theta ** (np.arange(0, P, 2, dtype=np.float64) / P)
  np.testing.assert_array_equal(layers.rope_inv_freq(cfg), plain.astype(np.float32))
  assert layers.rope_attention_factor(cfg) == 1.0
  assert layers.softmax_scale(cfg) == cfg.qk_head_dim ** -0.5 == 192 ** -0.5

  hf_inv, hf_factor = _hf_rotary_fp64(hf, cfg, monkeypatch)   # HF's float32 here
  assert hf_factor == 1.0
  np.testing.assert_allclose(hf_inv, plain, rtol=4 * EPS32)

  x = np.random.default_rng(1).standard_normal((1, 3, P)).astype(np.float32)
  pos = np.array([[0, 7, 4097]], np.int32)
  y = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  err = np.abs(y - ref.rope(x, pos, plain, 1.0))
  err_pair = np.maximum(err[..., 0::2], err[..., 1::2])
  bound = _fp32_rope_bound(x, pos, layers.rope_inv_freq(cfg), 1.0)
  print(f"no YaRN: apply_rope max err {err.max():.2e}, max err/bound "
        f"{np.max(err_pair / bound):.2f}")
  assert np.all(err_pair <= bound)


# 2. No sequence length switches YaRN ----------------------------------------------

def test_yarn_is_a_function_of_the_config_alone():
  """`yarn` is rope_factor > 1, nothing else: no original or current length turns it
  on or off (HF's dynamic rope types, and some trackers' 'length > 4K' checks, do), and
  the rope functions take no length argument."""
  v3 = config.deepseek_v3_671b()
  for orig in (1, 16, 4095, 4096, 4097, 163840, 10 ** 7):
    assert v3.replace(rope_original_max_len=orig).yarn
  assert v3.replace(rope_factor=1.0 + 1e-9).yarn
  assert not v3.replace(rope_factor=1.0).yarn
  assert not config.tiny().yarn and config.tiny_yarn().yarn
  assert list(inspect.signature(layers.rope_inv_freq).parameters) == ["cfg"]
  assert list(inspect.signature(layers.rope_attention_factor).parameters) == ["cfg"]
  assert list(inspect.signature(layers.softmax_scale).parameters) == ["cfg"]
  assert list(inspect.signature(layers.apply_rope).parameters) == ["x", "positions", "cfg"]


def test_apply_rope_does_not_depend_on_sequence_length():
  """apply_rope over positions 0..T-1, T in (16, 4096, 4097, 8192), gives the same rows
  at the positions they share, and so does a short call at long positions (decode at
  4090..4099): the table is a function of the position only. Tolerance 1e-6, float32
  noise (measured: bit-identical); turning YaRN off or on would move rows by O(0.1).
  And it is YaRN's table even for 16 tokens: the slow pairs rotate 40x slower than plain
  RoPE's (measured difference from plain RoPE over positions 0..15: 0.13)."""
  cfg = config.deepseek_v3_671b()
  P = cfg.qk_rope_head_dim
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8192, 1, P)), jnp.float32)
  rope = jax.jit(layers.apply_rope, static_argnums=2)

  def run(start, stop, c=cfg):
    pos = jnp.arange(start, stop, dtype=jnp.int32)[None]
    return np.asarray(rope(x[:, start:stop], pos, c))

  full = run(0, 8192)
  for T in (16, 4096, 4097):
    np.testing.assert_allclose(run(0, T), full[:, :T], rtol=0, atol=1e-6, err_msg=f"T={T}")
  np.testing.assert_allclose(run(4090, 4100), full[:, 4090:4100], rtol=0, atol=1e-6)

  short = run(0, 16)
  plain = run(0, 16, cfg.replace(rope_factor=1.0))
  inv = layers.rope_inv_freq(cfg).astype(np.float64)
  yarn_ref = ref.rope(np.asarray(x[:, :16], np.float64), np.arange(16)[None], inv, 1.0)
  np.testing.assert_allclose(short, yarn_ref, rtol=0, atol=1e-5)
  gap = np.abs(short - plain).max()
  print(f"16 tokens: YaRN vs plain RoPE max difference {gap:.2e}")
  assert gap > 1e-4


def test_mla_prefix_is_unchanged_past_the_original_length():
  """In the attention layer itself (tiny_yarn: YaRN factor 4 over an original length of
  16, so an extended context of 64): a sequence of 8 tokens and one of 80 (past both) give
  the same outputs on the first 8 tokens (causal attention: only a length-dependent rope or
  scale could change them), and those differ from the same layer with YaRN off."""
  cfg = config.tiny_yarn()
  assert cfg.yarn and cfg.rope_original_max_len == 16
  x0 = jnp.zeros((1, 4, cfg.d_model), jnp.float32)
  shapes = jax.eval_shape(MLA(cfg).init, jax.random.PRNGKey(0), x0,
                          jnp.zeros((1, 4), jnp.int32))
  params = jax.tree.map(jnp.asarray, ref.randomize(nn.unbox(shapes)["params"], 0))
  x = np.random.default_rng(3).standard_normal((1, 80, cfg.d_model)).astype(np.float32)

  apply = jax.jit(lambda c, x, pos: MLA(c).apply({"params": params}, x, pos),
                  static_argnums=0)

  def run(T, c=cfg):
    return np.asarray(apply(c, jnp.asarray(x[:, :T]), jnp.arange(T, dtype=jnp.int32)[None]))

  long, short = run(80), run(8)
  no_yarn = run(8, cfg.replace(rope_factor=1.0))
  print(f"MLA: 8 vs 80 tokens max diff {np.abs(short - long[:, :8]).max():.2e}, "
        f"YaRN off moves it {np.abs(no_yarn - short).max():.2e}")
  np.testing.assert_allclose(short, long[:, :8], rtol=0, atol=1e-6)
  assert np.abs(no_yarn - short).max() > 1e-4
