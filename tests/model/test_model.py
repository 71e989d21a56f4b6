"""The whole model: a numpy forward, causality (main and MTP heads), the shared embedding
and head, the balancing-bias collection, dtypes, jit, remat and tied embeddings."""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax.model import config
from deepseek_jax.train import losses
from deepseek_jax.model.transformer import BALANCE, Transformer, init_variables

# One dense layer, one MoE layer, two MTP modules (MoE blocks): 3 routed layers.
CFG = config.tiny().replace(n_layers=2)
B, T = 2, 8
V, D, E, L = CFG.vocab_size, CFG.d_model, CFG.n_routed_experts, CFG.n_routed_layers
SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
# One document per row: the same as no segment ids, and the same compiled forward as SEG.
ONE_DOC = np.ones((B, T), np.int32)


def _variables(cfg, seed=0):
  """Random O(1) params (shapes from eval_shape: an eager init costs many seconds) and the
  zero balancing bias."""
  shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, T), jnp.int32)))
  params = jax.tree.map(jnp.asarray, ref.randomize(shapes["params"], seed))
  balance = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[BALANCE])
  return {"params": params, BALANCE: balance}


@functools.lru_cache(maxsize=None)
def _forward(cfg, mtp=True):
  return jax.jit(lambda v, tokens, seg: Transformer(cfg).apply(v, tokens, None, seg, mtp=mtp))


def _tokens(seed=0, batch=B, length=T):
  return np.random.default_rng(seed).integers(0, V, size=(batch, length)).astype(np.int32)


def _with_bias(variables, bias_LE):
  return {"params": variables["params"], BALANCE: {"expert_bias": jnp.asarray(bias_LE)}}


@pytest.fixture(scope="module")
def variables():
  return _variables(CFG)


def test_output_shapes_and_dtypes(variables):
  out = _forward(CFG)(variables, _tokens(), SEG)
  assert out.logits.shape == (B, T, V) and out.logits.dtype == jnp.float32
  assert out.mtp_logits.shape == (2, B, T, V) and out.mtp_logits.dtype == jnp.float32
  assert out.hidden.shape == (B, T, D)
  stats = out.moe
  assert stats.load_E.shape == (L, E)
  assert (stats.aux_count_BE.shape == stats.aux_prob_BE.shape == stats.aux_score_BE.shape
          == (L, B, E))
  assert stats.n_tokens_B.shape == (L, B) and stats.dropped.shape == (L,)
  # Row 0 is the main MoE layer (all 7 valid tokens of row 0, all 8 of row 1); MTP
  # module k only routes positions whose token i+k is in the same document.
  np.testing.assert_array_equal(stats.n_tokens_B, [[7, 8], [5, 7], [3, 6]])
  np.testing.assert_array_equal(stats.load_E.sum(1), np.array([15, 12, 9]) * CFG.top_k)
  # Without MTP the stats keep one (zero) row per MTP block, as the bias has.
  no_mtp = jax.eval_shape(lambda v, t: Transformer(CFG).apply(v, t, mtp=False),
                          variables, _tokens())
  assert no_mtp.mtp_logits is None and no_mtp.moe.load_E.shape == (L, E)


def test_init_variables():
  model = Transformer(CFG)
  # Only the pieces looked at get compiled (XLA drops the rest of the init).
  balance, head, scale = jax.jit(lambda r: (
      lambda v: (v[BALANCE], v["params"]["head"], v["params"]["final_norm"]["scale"]))(
          init_variables(model, r)))(jax.random.PRNGKey(0))
  assert balance["expert_bias"].shape == (L, E)
  assert balance["expert_bias"].dtype == jnp.float32
  np.testing.assert_array_equal(balance["expert_bias"], 0.0)
  assert head.dtype == jnp.float32
  assert abs(float(jnp.std(head)) - CFG.init_std) < 0.1 * CFG.init_std
  np.testing.assert_array_equal(scale, 1.0)


NUMPY_CFGS = {
    "default": CFG,
    # Tied embeddings, HF's MTP input convention, a block eps unlike the latent norms'.
    "tied_feed_normed_eps": CFG.replace(tie_embeddings=True, mtp_feed_normed=True,
                                        rms_eps=1e-2),
    # Plain queries, YaRN, softmax router without normalised gates.
    "tiny_yarn": config.tiny_yarn().replace(n_layers=2),
}


@pytest.mark.parametrize("name", sorted(NUMPY_CFGS))
def test_model_matches_numpy(name):
  cfg = NUMPY_CFGS[name]
  tie = cfg.tie_embeddings
  variables = _variables(cfg, seed=1)
  bias = (np.random.default_rng(1).standard_normal((L, E)) * 0.3).astype(np.float32)
  tokens = _tokens(1)
  out = _forward(cfg)(_with_bias(variables, bias), tokens, SEG)
  logits, mtp_logits = ref.transformer(jax.tree.map(np.asarray, variables["params"]), bias,
                                       tokens, cfg, SEG)
  assert np.abs(logits).max() > 1.0
  np.testing.assert_allclose(out.logits, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.mtp_logits, mtp_logits, rtol=1e-4, atol=1e-4)
  assert ("head" in variables["params"]) != tie


def test_causality_via_jacobian(variables):
  """d logits[t] / d emb[s] == 0 for s > t; MTP module k at position i depends on the
  embeddings up to i + k and no further. With distinct tokens (and none equal to the
  shift fill 0) the embedding row of tokens[s] is the input embedding of position s."""
  tokens = np.random.default_rng(2).permutation(np.arange(1, V))[:T][None].astype(np.int32)
  r = jnp.asarray(np.random.default_rng(2).standard_normal(V), jnp.float32)

  def outputs(embed_VD):
    params = dict(variables["params"], embed=embed_VD)
    out = Transformer(CFG).apply({"params": params, BALANCE: variables[BALANCE]}, tokens)
    return out.logits[0] @ r, out.mtp_logits[:, 0] @ r

  jac_main, jac_mtp = jax.jit(jax.jacrev(outputs))(variables["params"]["embed"])
  main = np.linalg.norm(np.asarray(jac_main)[:, tokens[0]], axis=-1)     # [t, s]
  mtp = np.linalg.norm(np.asarray(jac_mtp)[:, :, tokens[0]], axis=-1)   # [k-1, i, s]
  t, s = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
  assert np.all(main[s > t] == 0.0)
  assert np.all(main[s <= t] > 1e-6)
  for k in range(1, CFG.mtp_depth + 1):
    assert np.all(mtp[k - 1][s > t + k] == 0.0), k
    assert np.all(mtp[k - 1][s <= t + k] > 1e-6), k


def test_causality_by_perturbing_future_tokens(variables):
  tokens = _tokens(3)
  base = _forward(CFG)(variables, tokens, ONE_DOC)
  for t in (0, 3, 6):
    changed = tokens.copy()
    changed[:, t + 1:] = (tokens[:, t + 1:] + 1 + np.arange(T - t - 1)) % V
    out = _forward(CFG)(variables, changed, ONE_DOC)
    np.testing.assert_allclose(out.logits[:, :t + 1], base.logits[:, :t + 1], atol=1e-6)
    assert np.abs(out.logits[:, t + 1] - base.logits[:, t + 1]).max() > 1e-3
    for k in range(1, CFG.mtp_depth + 1):
      keep = max(t + 1 - k, 0)  # positions i with i + k <= t
      np.testing.assert_allclose(out.mtp_logits[k - 1, :, :keep],
                                 base.mtp_logits[k - 1, :, :keep], atol=1e-6)
      assert np.abs(out.mtp_logits[k - 1, :, keep] - base.mtp_logits[k - 1, :, keep]).max() > 1e-3


def test_jit_equals_no_jit():
  cfg = CFG.replace(mtp_depth=1)
  variables = _variables(cfg, seed=4)
  tokens = _tokens(4, batch=1, length=6)
  seg = np.array([[1, 1, 1, 2, 2, 0]], np.int32)
  eager = Transformer(cfg).apply(variables, tokens, None, seg)
  jitted = _forward(cfg)(variables, tokens, seg)
  np.testing.assert_allclose(jitted.logits, eager.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jitted.mtp_logits, eager.mtp_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jitted.moe.load_E, eager.moe.load_E)


def test_mtp_shares_embedding_and_head(variables):
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  names = {jax.tree_util.keystr(path): leaf.shape for path, leaf in flat}
  with_vocab = sorted(name for name, shape in names.items() if V in shape)
  assert with_vocab == ["['embed']", "['head']"], with_vocab
  assert names["['embed']"] == (V, D) and names["['head']"] == (D, V)
  assert not any("embed" in n or "head" in n for n in names if n.startswith("['mtp_"))

  # Perturbing column v of the one head moves column v of every head's logits, only it.
  tokens, v = _tokens(5), 11
  base = _forward(CFG)(variables, tokens, SEG)
  params = dict(variables["params"])
  params["head"] = params["head"].at[:, v].add(1.0)
  out = _forward(CFG)({"params": params, BALANCE: variables[BALANCE]}, tokens, SEG)
  others = np.arange(V) != v
  np.testing.assert_allclose(out.logits[..., others], base.logits[..., others], atol=1e-6)
  np.testing.assert_allclose(out.mtp_logits[..., others], base.mtp_logits[..., others],
                             atol=1e-6)
  assert np.abs(out.logits[..., v] - base.logits[..., v]).min() > 1e-3
  assert np.abs(out.mtp_logits[..., v] - base.mtp_logits[..., v]).min() > 1e-3

  # The embedding row of the token read by MTP module 1 (only) at the last position.
  tokens = np.array([[1, 2, 3, 4, 5, 6, 7, 8]] * B, np.int32)
  params = dict(variables["params"])
  params["embed"] = params["embed"].at[8].add(0.5)
  base = _forward(CFG)(variables, tokens, ONE_DOC)
  out = _forward(CFG)({"params": params, BALANCE: variables[BALANCE]}, tokens, ONE_DOC)
  np.testing.assert_allclose(out.logits[:, :-1], base.logits[:, :-1], atol=1e-6)
  np.testing.assert_allclose(out.mtp_logits[0, :, :-2], base.mtp_logits[0, :, :-2], atol=1e-6)
  assert np.abs(out.mtp_logits[0, :, -2] - base.mtp_logits[0, :, -2]).max() > 1e-3


def test_expert_bias_rows_steer_their_layer(variables):
  assert variables[BALANCE]["expert_bias"].shape == (L, E)
  tokens = _tokens(6)
  base = _forward(CFG)(variables, tokens, SEG)
  routed = np.asarray(base.moe.n_tokens_B.sum(1))
  for row in range(L):
    bias = np.zeros((L, E), np.float32)
    bias[row, [0, 1, 2]] = 10.0  # experts 0, 1 (group 0) and 2 (group 1): all tokens
    out = _forward(CFG)(_with_bias(variables, bias), tokens, SEG)
    np.testing.assert_array_equal(out.moe.load_E[row], [routed[row]] * 3 + [0] * (E - 3))
    assert not np.array_equal(out.moe.load_E[row], base.moe.load_E[row])
    # Earlier layers never see a later row.
    np.testing.assert_array_equal(out.moe.load_E[:row], base.moe.load_E[:row])
  # A uniform shift of a row changes nothing.
  bias = np.zeros((L, E), np.float32)
  bias[0] += 5.0
  bias[2] -= 3.0
  out = _forward(CFG)(_with_bias(variables, bias), tokens, SEG)
  np.testing.assert_array_equal(out.moe.load_E, base.moe.load_E)
  np.testing.assert_allclose(out.logits, base.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.mtp_logits, base.mtp_logits, rtol=1e-5, atol=1e-5)


def _loss_fn(cfg):
  def loss(params, balance, tokens_BT1, seg_BT1):
    out = Transformer(cfg).apply({"params": params, BALANCE: balance}, tokens_BT1[:, :-1],
                                 None, seg_BT1[:, :-1])
    return losses.lm_losses(out, tokens_BT1, seg_BT1)["loss"]
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_remat_same_loss_and_grads_and_no_bias_grad():
  cfg = CFG.replace(mtp_depth=1)  # a smaller graph: two gradient compiles
  variables = _variables(cfg, seed=7)
  tokens = _tokens(7, length=T + 1)
  seg = np.concatenate([SEG, SEG[:, -1:]], 1)
  bias = jnp.asarray(np.random.default_rng(7).standard_normal((2, E)) * 0.3, jnp.float32)
  balance = {"expert_bias": bias}
  loss, (grads, bias_grad) = _loss_fn(cfg)(variables["params"], balance, tokens, seg)
  loss_r, (grads_r, _) = _loss_fn(cfg.replace(remat=True))(variables["params"], balance,
                                                          tokens, seg)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_r = jax.tree.leaves(grads_r)
  assert len(flat) == len(flat_r)
  for (path, g), g_r in zip(flat, flat_r):
    np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  assert np.abs(grads["mtp_0"]["block"]["moe"]["w_router"]).max() > 0
  # The balancing bias is state, not a parameter: no gradient reaches it.
  np.testing.assert_array_equal(bias_grad["expert_bias"], 0.0)


def test_bf16_compute_keeps_float32_logits_close_to_f32(variables):
  cfg16 = CFG.replace(dtype="bfloat16")
  tokens = _tokens(8)
  out32 = _forward(CFG)(variables, tokens, SEG)
  out16 = _forward(cfg16)(variables, tokens, SEG)
  assert out16.logits.dtype == jnp.float32 and out16.mtp_logits.dtype == jnp.float32
  assert out16.hidden.dtype == jnp.bfloat16
  for a16, a32 in ((out16.logits, out32.logits), (out16.mtp_logits, out32.mtp_logits)):
    a16, a32 = np.asarray(a16), np.asarray(a32)
    rel = np.linalg.norm(a16 - a32) / np.linalg.norm(a32)
    assert rel < 0.05, rel
    # ... yet bf16 did run (not silently float32).
    assert rel > 1e-4, rel


def test_scanned_layers_equal_unrolled_loss_and_grads():
  """cfg.scan_layers runs the dense and the MoE blocks as two flax scans over stacked
  params (here rematerialised with a policy, as the 671B config does): same loss, same
  gradients (restacked) and the same AdamW update as the unrolled blocks (the update
  is what a rank-based weight-decay mask got wrong for stacked norm scales)."""
  from deepseek_jax.model.transformer import stack_layers, unstack_layers
  cfg = config.tiny().replace(n_layers=4, first_k_dense=2, mtp_depth=1)
  variables = _variables(cfg, seed=3)
  tokens = _tokens(3, length=T + 1)
  seg = np.concatenate([SEG, SEG[:, -1:]], 1)
  bias = jnp.asarray(np.random.default_rng(3).standard_normal((3, E)) * 0.3, jnp.float32)
  loss, (grads, _) = _loss_fn(cfg)(variables["params"], {"expert_bias": bias}, tokens, seg)
  scfg = cfg.replace(scan_layers=True, remat=True, remat_policy="dots_no_batch")
  stacked = stack_layers(variables["params"], cfg)
  assert set(stacked) >= {"dense_layers", "moe_layers"} and "layer_0" not in stacked
  loss_s, (grads_s, _) = _loss_fn(scfg)(stacked, {"expert_bias": bias}, tokens, seg)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  assert jax.tree.structure(grads_s) == jax.tree.structure(stacked)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_s = jax.tree.leaves(unstack_layers(grads_s, cfg))
  for (path, g), g_s in zip(flat, flat_s):
    np.testing.assert_allclose(g_s, g, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # One optimizer step of each layout, compared restacked. Unit gradients make the Adam
  # direction exactly -1 everywhere, so a parameter's update differs between the
  # layouts only through what the optimizer does with it by layout (its decay).
  from deepseek_jax.train import step as train_step
  import ml_collections
  opt = ml_collections.ConfigDict(dict(peak_lr=1e-2, min_lr_ratio=0.1, warmup_steps=0,
                                       decay_start_frac=1.0, b1=0.9, b2=0.95, eps=1e-8,
                                       weight_decay=0.1, grad_clip=1e9))
  tx = train_step.make_optimizer(opt, 10)

  @jax.jit
  def updated(params):
    ones = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(ones, tx.init(params), params)
    return jax.tree.map(lambda p, u: p + u, params, upd)
  new = jax.tree_util.tree_flatten_with_path(updated(variables["params"]))[0]
  new_s = jax.tree.leaves(unstack_layers(updated(stacked), cfg))
  for (path, a), a_s in zip(new, new_s):
    np.testing.assert_allclose(a_s, a, rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # The scanned model's own init has the stacked layout (leading layer dim).
  shapes = nn.unbox(jax.eval_shape(Transformer(scfg).init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, T), jnp.int32)))["params"]
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, stacked)
  assert shapes["moe_layers"]["block"]["attn"]["w_dkv"].shape[0] == 2
