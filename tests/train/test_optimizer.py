"""The optimizer: which parameters AdamW decays, checked on the update it makes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from deepseek_jax.model import config
from deepseek_jax.model.transformer import Transformer, init_variables
from deepseek_jax.train import step as train_step

LR, WD = 1e-2, 0.1


def _opt_cfg():
  return ml_collections.ConfigDict(dict(
      peak_lr=LR, min_lr_ratio=0.1, warmup_steps=0, decay_start_frac=1.0, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=WD, grad_clip=1.0))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_weight_decay_spares_norm_scales_and_decays_every_matrix(scan):
  """One AdamW step with zero gradients moves a parameter only through weight decay
  (p -= lr * wd * p): every RMSNorm scale must stay exactly 1.0, scanned ([layers, D],
  2-D like a matrix) as well as unrolled ([D]); every weight matrix shrinks by 1 - lr wd."""
  cfg = config.tiny().replace(scan_layers=scan, mtp_depth=1)
  params = init_variables(Transformer(cfg), jax.random.key(0))["params"]
  tx = train_step.make_optimizer(_opt_cfg(), total_steps=10)

  @jax.jit
  def one_step(params):
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return jax.tree.map(lambda p, u: p + u, params, updates)

  new = dict(jax.tree_util.tree_leaves_with_path(one_step(params)))
  scales = []
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      scales.append(p.ndim)
      np.testing.assert_array_equal(new[path], p, err_msg=f"{name} was decayed")
    else:
      np.testing.assert_allclose(new[path], p * (1 - LR * WD), rtol=1e-6, atol=1e-9,
                                 err_msg=f"{name} was not decayed")
  # the blocks' attention, FFN and latent norms, stacked when scanned; the MTP module's
  assert len(scales) >= 8 and (2 in scales) == scan
