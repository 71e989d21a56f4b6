"""int8 weight-only quantisation (inference/quantize.py): the per-channel round-trip
bound, which axes each weight contracts, and a tiny model's logits with int8 weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference import quantize
from deepseek_jax.model import config, kv_cache
from deepseek_jax.model.transformer import Transformer
from tests.inference.test_mha_cache import _variables

TINY = config.tiny().replace(n_layers=3, mtp_depth=0)


@pytest.mark.parametrize("shape,axes", [((64, 48), (0,)), ((6, 16, 40), (0, 1)),
                                        ((8, 32, 24), (1,)), ((97, 32), (1,))])
def test_round_trip_error_is_at_most_half_a_step_per_channel(shape, axes):
  w = jnp.asarray(np.random.default_rng(0).standard_normal(shape) *
                  np.random.default_rng(1).uniform(0.01, 3.0, shape[-1]), jnp.float32)
  qw = quantize.quantize(w, axes)
  assert qw.q.dtype == jnp.int8 and qw.scale.shape == quantize.scale_shape(shape, axes)
  err = jnp.abs(w - quantize.dequantize(qw, jnp.float32))
  bound = qw.scale / 2 * (1 + 1e-6)
  assert bool(jnp.all(err <= bound)), float(jnp.max(err - qw.scale / 2))
  # The scale is the channel's max |w| / 127: that element is exact, none clips.
  np.testing.assert_allclose(jnp.max(jnp.abs(qw.q), axis=axes), 127)


def test_contraction_axes_follow_the_einsums():
  ca = quantize.contraction_axes
  assert ca("w_dkv", ("embed", "kv_lora"), 2) == (0,)
  assert ca("w_uq", ("q_lora", "heads", "head_dim"), 3) == (0,)
  assert ca("w_o", ("heads", "head_dim", "embed"), 3) == (0, 1)
  assert ca("w_down", ("expert", "mlp", "embed"), 3) == (1,)
  assert ca("embed", ("vocab", "embed"), 2) == (1,)
  assert ca("w_router", ("embed", "expert"), 2) is None
  assert ca("scale", ("norm",), 1) is None


def test_int8_weights_give_logits_close_to_float():
  """Decode a prompt and three steps with the weights quantised and dequantised inside
  the step: the logits stay within 5% of the float logits' range; norms stay float."""
  v = _variables(TINY)
  model = Transformer(TINY)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  boxed = jax.tree.map(lambda box, x: box.replace_boxed(x), boxed["params"], v["params"],
                       is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  q = quantize.quantize_params(boxed)
  kinds = {jax.tree_util.keystr(p): type(x).__name__ for p, x in
           jax.tree_util.tree_leaves_with_path(
               q, is_leaf=lambda x: isinstance(x, quantize.Int8Weight))}
  assert kinds["['layer_0']['attn']['w_dq']"] == "Int8Weight"
  assert kinds["['layer_1']['moe']['w_up']"] == "Int8Weight"
  assert kinds["['layer_0']['attn_norm']['scale']"] == "ArrayImpl"

  def run(params, tokens, cache):
    params = quantize.dequantize_params(params, TINY.jnp_dtype)
    return model.apply({**v, "params": params}, tokens, cache, method=Transformer.extend)

  run = jax.jit(run)
  tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 5)).astype(np.int32)
  c_f = c_q = kv_cache.create(TINY, TINY.n_layers, 2, 12)
  worst, span = 0.0, 0.0
  for _ in range(4):
    out_f, c_f = run(v["params"], tokens, c_f)
    out_q, c_q = run(q, tokens, c_q)
    a, b = np.asarray(out_f.logits), np.asarray(out_q.logits)
    worst, span = max(worst, float(np.abs(a - b).max())), max(span, float(np.ptp(a)))
    tokens = a[:, -1:].argmax(-1).astype(np.int32)
  assert 0 < worst <= 0.05 * span, (
      f"int8 logits max |diff| {worst:.3g} (float range {span:.3g})")
