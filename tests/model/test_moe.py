"""DeepSeekMoE: routing, the dispatch paths, capacity drops and MoEStats, against
numpy loops over tokens and their chosen experts."""

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax.model import config, dispatch, moe

B, T = 2, 8
X = B * T
CFG = config.tiny()  # E=8 in 4 groups of 2, keep 2 groups, top-3, sigmoid, scale 2.5
SOFTMAX = config.tiny().replace(score_func="softmax", norm_topk_prob=False,
                                routed_scaling_factor=1.5, n_group=2, topk_group=1)
VALID = np.ones((B, T), bool)
VALID[0, 6:] = False
VALID[1, 0] = False

DISPATCHES = {
    "reference": dict(moe_dispatch="reference"),
    "capacity": dict(moe_dispatch="capacity", capacity_factor=100.0),
    "dropless": dict(moe_dispatch="dropless"),
    "dropless_b2": dict(moe_dispatch="dropless", moe_block_size=2),
    "ragged": dict(moe_dispatch="ragged"),
    # The GPU grouped-GEMM library's ragged_dot (its XLA path on CPU) in the same dispatch.
    "ragged_tokamax": dict(moe_dispatch="ragged", grouped_matmul="tokamax"),
}


def _params(cfg, seed=0):
  u = jnp.zeros((1, 2, cfg.d_model), jnp.float32)
  shapes = jax.eval_shape(moe.MoE(cfg).init, jax.random.PRNGKey(0), u,
                          jnp.zeros((cfg.n_routed_experts,)))
  params = ref.randomize(nn.unbox(shapes)["params"], seed, std=0.25)
  return jax.tree.map(jnp.asarray, params)


def _inputs(cfg, seed=0):
  return np.random.default_rng(seed).standard_normal((B, T, cfg.d_model)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(lambda p, u, bias, valid: moe.MoE(cfg).apply({"params": p}, u, bias, valid))


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_stats(stats, expected, atol=1e-5):
  for name in ("load_E", "aux_count_BE", "aux_prob_BE", "aux_score_BE", "n_tokens_B",
               "dropped"):
    np.testing.assert_allclose(np.asarray(getattr(stats, name)), expected[name],
                               rtol=1e-5, atol=atol, err_msg=name)


# Routing ---------------------------------------------------------------------------

@pytest.mark.parametrize("func", ["sigmoid", "softmax"])
def test_affinities(func):
  logits = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32) * 3
  got = moe.affinities(jnp.asarray(logits), CFG.replace(score_func=func))
  np.testing.assert_allclose(got, ref.affinities(logits, func), rtol=1e-6, atol=1e-7)


ROUTE_CFGS = {
    "groups4_keep2_sigmoid_norm": CFG,
    "groups2_keep1_softmax": SOFTMAX,
    "no_groups_sigmoid_unnormed": CFG.replace(n_group=1, topk_group=1, norm_topk_prob=False),
    "groups4_keep3_softmax_norm": CFG.replace(score_func="softmax", topk_group=3, top_k=4),
    "groups4_keep2_sigmoid_mul": CFG.replace(bias_mode="mul"),
}


@pytest.mark.parametrize("name", sorted(ROUTE_CFGS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_numpy_loops(name, with_bias):
  cfg = ROUTE_CFGS[name]
  rng = np.random.default_rng(1)
  scores = ref.affinities(rng.standard_normal((64, 8)) * 2, cfg.score_func).astype(np.float32)
  neutral = 1.0 if cfg.bias_mode == "mul" else 0.0
  bias = (neutral + (rng.standard_normal(8) * 0.3 if with_bias else 0)) * np.ones(8)
  bias = bias.astype(np.float32)
  idx, gates = moe.route(jnp.asarray(scores), jnp.asarray(bias), cfg)
  ref_idx, ref_gates = ref.route(scores, bias, cfg)
  np.testing.assert_array_equal(np.asarray(idx), np.array(ref_idx))
  np.testing.assert_allclose(gates, np.array(ref_gates), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(moe.select_experts(jnp.asarray(scores), jnp.asarray(bias), cfg),
                                np.array(ref_idx))


def test_multiplicative_bias_picks_by_product():
  # s = [.9, .5, .4, .1], b = [.5, 1, 1, 2]: s * b = [.45, .5, .4, .2] picks {1, 0};
  # s + b = [1.4, 1.5, 1.4, 2.1] would pick {3, 1}. Gates stay the unbiased s.
  cfg = CFG.replace(n_routed_experts=4, n_group=1, topk_group=1, top_k=2,
                    norm_topk_prob=False, routed_scaling_factor=1.0, bias_mode="mul")
  scores = jnp.array([[0.9, 0.5, 0.4, 0.1]])
  bias = jnp.array([0.5, 1.0, 1.0, 2.0])
  idx, gates = moe.route(scores, bias, cfg)
  np.testing.assert_array_equal(idx, [[1, 0]])
  np.testing.assert_allclose(gates, [[0.5, 0.9]])
  np.testing.assert_array_equal(moe.route(scores, bias, cfg.replace(bias_mode="add"))[0],
                                [[3, 1]])


def test_group_limit_drops_the_best_single_expert():
  # Group sums of the top-2: g0 = 1.00 (holds the best expert, 0.99), g1 = 1.18,
  # g2 = 1.10, g3 = 0.20. Keeping 2 groups drops g0, so expert 0 must not be picked.
  scores = np.array([[0.99, 0.01, 0.60, 0.58, 0.56, 0.54, 0.10, 0.10]], np.float32)
  idx = np.asarray(moe.select_experts(jnp.asarray(scores), jnp.zeros(8), CFG))
  assert 0 not in idx
  np.testing.assert_array_equal(idx[0], [2, 3, 4])
  np.testing.assert_array_equal(idx[0], ref.select(scores[0], np.zeros(8), 4, 2, 3))
  # Without groups the best expert wins.
  flat = np.asarray(moe.select_experts(jnp.asarray(scores), jnp.zeros(8),
                                       CFG.replace(n_group=1, topk_group=1)))
  assert 0 in flat


def test_dropped_groups_are_masked_with_minus_inf_not_zero():
  # Every score + bias is negative: a 0-masked dropped group would beat the kept ones.
  scores = np.array([[0.99, 0.01, 0.60, 0.58, 0.56, 0.54, 0.10, 0.10]], np.float32)
  bias = np.full(8, -5.0, np.float32)
  idx = np.asarray(moe.select_experts(jnp.asarray(scores), jnp.asarray(bias), CFG))
  np.testing.assert_array_equal(idx[0], [2, 3, 4])


def test_bias_changes_choice_but_never_gates():
  rng = np.random.default_rng(2)
  scores = ref.affinities(rng.standard_normal((64, 8)), "sigmoid").astype(np.float32)
  bias = (rng.standard_normal(8) * 0.5).astype(np.float32)
  idx0, _ = moe.route(jnp.asarray(scores), jnp.zeros(8), CFG)
  idx, gates = moe.route(jnp.asarray(scores), jnp.asarray(bias), CFG)
  idx0, idx, gates = np.asarray(idx0), np.asarray(idx), np.asarray(gates)
  changed = [set(a) != set(b) for a, b in zip(idx0, idx)]
  assert sum(changed) >= 10
  picked = np.take_along_axis(scores, idx, axis=1).astype(np.float64)
  expected = picked / picked.sum(1, keepdims=True) * CFG.routed_scaling_factor
  np.testing.assert_allclose(gates, expected, rtol=1e-6)
  np.testing.assert_allclose(gates.sum(1), CFG.routed_scaling_factor, rtol=1e-6)
  # Unnormalised: the gates are the raw unbiased scores times the scale.
  _, raw = moe.route(jnp.asarray(scores), jnp.asarray(bias), CFG.replace(norm_topk_prob=False))
  np.testing.assert_allclose(raw, picked * CFG.routed_scaling_factor, rtol=1e-6)


# The layer ------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", sorted(DISPATCHES))
@pytest.mark.parametrize("base", ["sigmoid", "softmax"])
def test_moe_layer_matches_numpy(dispatch, base):
  cfg = (CFG if base == "sigmoid" else SOFTMAX).replace(**DISPATCHES[dispatch])
  p = _params(cfg)
  u = _inputs(cfg)
  bias = (np.random.default_rng(3).standard_normal(8) * 0.2).astype(np.float32)
  y, stats = _apply(cfg)(p, u, bias, VALID)
  y_ref, stats_ref = ref.moe(_np(p), u, bias, cfg, VALID)
  assert np.abs(y_ref).max() > 0.5
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  _assert_stats(stats, stats_ref)
  assert float(stats.dropped) == 0.0


def test_padding_gets_no_routed_output_and_no_stats():
  cfg = CFG.replace(moe_dispatch="dropless")
  p = _params(cfg, seed=4)
  u = _inputs(cfg, seed=4)
  y, stats = _apply(cfg)(p, u, np.zeros(8, np.float32), VALID)
  sh = _np(p)["shared"]
  for b, t in zip(*np.nonzero(~VALID)):
    np.testing.assert_allclose(y[b, t], ref.swiglu(u[b, t], sh["w_gate"], sh["w_up"],
                                                   sh["w_down"]), rtol=1e-5, atol=1e-6)
  n_valid = VALID.sum()
  assert float(stats.load_E.sum()) == n_valid * cfg.top_k
  np.testing.assert_array_equal(stats.n_tokens_B, VALID.sum(1))
  np.testing.assert_allclose(stats.aux_count_BE.sum(1), VALID.sum(1) * cfg.top_k)
  np.testing.assert_allclose(stats.aux_prob_BE.sum(1), VALID.sum(1), rtol=1e-5)
  # Changing a padding token's input changes nothing but its own (shared) output.
  u2 = u.copy()
  u2[~VALID] = 7.0
  y2, stats2 = _apply(cfg)(p, u2, np.zeros(8, np.float32), VALID)
  np.testing.assert_allclose(np.asarray(y2)[VALID], np.asarray(y)[VALID], rtol=1e-6, atol=1e-7)
  for name in ("load_E", "aux_count_BE", "aux_prob_BE", "aux_score_BE"):
    np.testing.assert_allclose(getattr(stats2, name), getattr(stats, name), rtol=1e-6)


def test_aux_stats_use_plain_top_k_without_bias():
  """The routing map of the balance losses ignores the bias and the group limit too
  (V3 eq. 18: plain top-K over all experts)."""
  cfg = CFG.replace(moe_dispatch="dropless")
  p = _params(cfg, seed=5)
  u = _inputs(cfg, seed=5)
  bias = np.array([3.0, 3.0, 0, 0, 0, 0, 0, 0], np.float32)  # forces experts 0 and 1
  _, stats = _apply(cfg)(p, u, bias, VALID)
  _, stats_ref = ref.moe(_np(p), u, bias, cfg, VALID)
  _, unbiased_ref = ref.moe(_np(p), u, np.zeros(8), cfg, VALID)
  np.testing.assert_array_equal(stats.load_E[:2], [VALID.sum()] * 2)
  np.testing.assert_allclose(stats.aux_count_BE, unbiased_ref["aux_count_BE"])
  np.testing.assert_allclose(stats.load_E, stats_ref["load_E"])
  assert not np.allclose(stats.aux_count_BE.sum(0), stats.load_E)
  # P_i: normalised unbiased scores, summed over valid tokens.
  scores = ref.affinities(u.reshape(X, -1) @ ref.f64(p["w_router"]), "sigmoid")
  # The group-limited top-K (CFG keeps 2 of 4 groups) would count otherwise here.
  limited = np.zeros((X, 8))
  for x in range(X):
    limited[x, ref.select(scores[x], np.zeros(8), cfg.n_group, cfg.topk_group, cfg.top_k)] = 1
  limited = (limited.reshape(B, T, 8) * VALID[..., None]).sum(1)
  assert not np.array_equal(np.asarray(stats.aux_count_BE), limited)
  prob = (scores / scores.sum(1, keepdims=True)).reshape(B, T, 8) * VALID[..., None]
  np.testing.assert_allclose(stats.aux_prob_BE, prob.sum(1), rtol=1e-5)
  # The raw affinities, summed over valid tokens (the classic aux loss's P_i).
  raw = scores.reshape(B, T, 8) * VALID[..., None]
  np.testing.assert_allclose(stats.aux_score_BE, raw.sum(1), rtol=1e-5)


def _loss_and_grads(cfg, p, u, bias, r):
  def loss(p, u):
    y, stats = moe.MoE(cfg).apply({"params": p}, u, bias, VALID)
    return jnp.sum(y * r) + jnp.sum(stats.aux_prob_BE * r[:, :1, :8])
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, u)


def test_dispatch_paths_have_equal_gradients():
  p = _params(CFG, seed=6)
  u = _inputs(CFG, seed=6)
  bias = (np.random.default_rng(6).standard_normal(8) * 0.2).astype(np.float32)
  r = np.random.default_rng(7).standard_normal((B, T, CFG.d_model)).astype(np.float32)
  results = {name: _loss_and_grads(CFG.replace(**kw), p, u, bias, r)
             for name, kw in DISPATCHES.items()}
  loss_ref, (gp_ref, gu_ref) = results.pop("reference")
  for name, (loss, (gp, gu)) in results.items():
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(gu, gu_ref, rtol=1e-4, atol=1e-5, err_msg=name)
    for key in ("w_gate", "w_up", "w_down", "w_router"):
      assert np.abs(gp_ref[key]).max() > 1e-3, key
      np.testing.assert_allclose(gp[key], gp_ref[key], rtol=1e-4, atol=1e-5,
                                 err_msg=f"{name} {key}")


# The ragged path against the reference, below the layer -------------------------

def _expert_problem(seed, X=12, K=3, E=6, D=8, F=5):
  """Distinct top-K ids per token from experts 0..E-2 (E-1 gets no token), two padding
  tokens and one padding slot (sentinel E), random gates and weights."""
  rng = np.random.default_rng(seed)
  idx_XK = np.stack([rng.permutation(E - 1)[:K] for _ in range(X)])
  idx_XK[[0, 5]] = E
  idx_XK[2, 1] = E
  gates_XK = rng.random((X, K)).astype(np.float32)
  x_XD = rng.standard_normal((X, D)).astype(np.float32)
  ws = [(0.3 * rng.standard_normal(s)).astype(np.float32)
        for s in [(E, D, F), (E, D, F), (E, F, D)]]
  ct_XD = rng.standard_normal((X, D)).astype(np.float32)
  return x_XD, idx_XK, gates_XK, ws, ct_XD


def _value_and_grads(fn, x_XD, idx_XK, gates_XK, ws, ct_XD):
  """(y, dropped) and the gradients of sum(y * ct) wrt x, gates and the three weights."""
  def loss(x, gates, *ws):
    y, dropped = fn(x, idx_XK, gates, *ws)
    return jnp.sum(y * ct_XD), (y, dropped)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      x_XD, gates_XK, *ws)
  return out, grads


@pytest.mark.parametrize("n_rows,impl", [(None, "xla"), (20, "xla"), (1, "xla"),
                                         (50, "xla"), (20, "tokamax")])
def test_ragged_matches_reference_on_kept_assignments(n_rows, impl):
  """A cap of R rows keeps the first R assignments of the stable sort by expert id (the
  end of that order, the highest experts, loses); the kept ones give exactly the
  reference's output and gradients, the rest are counted."""
  x_XD, idx_XK, gates_XK, ws, ct_XD = _expert_problem(seed=12)
  X, K = idx_XK.shape
  E = ws[0].shape[0]
  e_A = idx_XK.reshape(-1)
  kept_A = np.zeros(X * K, bool)
  kept_A[np.argsort(e_A, kind="stable")[:n_rows]] = True  # [:None]: all
  kept_A &= e_A < E
  n_real = int((e_A < E).sum())
  assert n_real == 36 - 7 and not (e_A == E - 1).any()  # 7 padding slots, 1 idle expert
  assert int(kept_A.sum()) == min(n_real, n_rows or X * K)
  ragged = functools.partial(dispatch.experts_ragged, n_rows=n_rows, impl=impl)
  (y, dropped), grads = _value_and_grads(ragged, x_XD, idx_XK, gates_XK, ws, ct_XD)
  kept_XK = np.where(kept_A.reshape(X, K), idx_XK, E)
  (y_ref, _), grads_ref = _value_and_grads(dispatch.experts_reference, x_XD, kept_XK,
                                           gates_XK, ws, ct_XD)
  assert float(dropped) == n_real - kept_A.sum()
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for name, g, g_ref in zip(["x", "gates", "w_gate", "w_up", "w_down"], grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6, err_msg=name)
  # Padding and dropped assignments get no gradient; an unused expert neither.
  np.testing.assert_array_equal(np.asarray(grads[1]).reshape(-1)[~kept_A], 0.0)
  np.testing.assert_array_equal(grads[2][E - 1], 0.0)


def _capacity(cfg):
  return max(1, min(math.ceil(cfg.capacity_factor * X * cfg.top_k / cfg.n_routed_experts), X))


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_capacity_drops_match_numpy_count(factor):
  cfg = CFG.replace(moe_dispatch="capacity", capacity_factor=factor)
  C = _capacity(cfg)
  assert dispatch.capacity(X, cfg) == C
  p = _params(cfg, seed=8)
  u = _inputs(cfg, seed=8)
  bias = np.array([0.4, 0.3, 0, 0, 0, 0, 0, 0], np.float32)  # skew: forces drops
  y, stats = _apply(cfg)(p, u, bias, VALID)
  y_ref, stats_ref = ref.moe(_np(p), u, bias, cfg, VALID, capacity=C)
  assert stats_ref["dropped"] > 0
  assert float(stats.dropped) == stats_ref["dropped"]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  _assert_stats(stats, stats_ref)  # load counts the routing, dropped or not


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_blocks_matches_gathered_weights(dtype):
  """The dropless path's block loop (a hand-written backward) against the batched
  SwiGLU on per-block gathered weights, differentiated by JAX: values and every
  gradient. Blocks at or past n_live give 0 and get no gradient; an expert used by
  several blocks sums their weight gradients; an unused expert gets 0."""
  rng = np.random.default_rng(3)
  n, b, D, F, E, n_live = 6, 4, 8, 5, 4, 4
  expert_n = jnp.asarray([0, 0, 2, 3, 3, 3], jnp.int32)   # expert 1 unused
  x = jnp.asarray(rng.standard_normal((n, b, D)), dtype)
  ws = [jnp.asarray(rng.standard_normal(s) * 0.5, dtype) for s in ((E, D, F), (E, D, F),
                                                                    (E, F, D))]
  live = (jnp.arange(n) < n_live)[:, None, None]
  dy = jnp.asarray(rng.standard_normal((n, b, D)), dtype)

  def looped(x, wg, wu, wd):
    return jnp.sum(dispatch.swiglu_blocks(x, expert_n, n_live, wg, wu, wd) * dy)

  def gathered(x, wg, wu, wd):
    y = dispatch.swiglu_experts(x, wg[expert_n], wu[expert_n], wd[expert_n], "n")
    return jnp.sum(jnp.where(live, y, 0) * dy)

  y = dispatch.swiglu_blocks(x, expert_n, n_live, *ws)
  y_ref = dispatch.swiglu_experts(x, *(w[expert_n] for w in ws), "n")
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=5e-2)
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(f32(y[:n_live]), f32(y_ref[:n_live]), **tol)
  assert not np.any(f32(y[n_live:]))
  grads = jax.jit(jax.grad(looped, argnums=(0, 1, 2, 3)))(x, *ws)
  grads_ref = jax.jit(jax.grad(gathered, argnums=(0, 1, 2, 3)))(x, *ws)
  for name, g, g_ref in zip(("x", "w_gate", "w_up", "w_down"), grads, grads_ref):
    assert g.dtype == g_ref.dtype, name
    np.testing.assert_allclose(f32(g), f32(g_ref), err_msg=name, **tol)
  assert not np.any(f32(grads[0][n_live:]))     # dead blocks: no input gradient
  assert not np.any(f32(grads[1][1]))           # unused expert: no weight gradient


def test_grouped_matmul_needs_the_ragged_dispatch():
  with pytest.raises(ValueError, match="grouped_matmul.*moe_dispatch='ragged'"):
    CFG.replace(moe_dispatch="dropless", grouped_matmul="tokamax")
  with pytest.raises(ValueError, match="grouped_matmul"):
    CFG.replace(moe_dispatch="ragged", grouped_matmul="cublas")


def test_dense_experts_match_reference_and_take_over_only_small_decodes():
  """experts_dense (every expert on every token, used for a few tokens of a small
  model) against the reference loop: values and gradients, padding (expert E) and
  repeated picks included; and the switch: never at training token counts, never for
  weights that are expensive to read in full."""
  rng = np.random.default_rng(5)
  X, D, F, E, K = 6, 8, 4, 5, 2
  x = jnp.asarray(rng.standard_normal((X, D)), jnp.float32)
  idx = jnp.asarray([[0, 3], [4, 1], [2, 2], [E, E], [1, E], [3, 0]], jnp.int32)
  gates = jnp.asarray(rng.uniform(0.1, 1.0, (X, K)), jnp.float32)
  ws = [jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)
        for s in ((E, D, F), (E, D, F), (E, F, D))]
  y, dropped = dispatch.experts_dense(x, idx, gates, *ws)
  y_ref, _ = dispatch.experts_reference(x, idx, gates, *ws)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  assert float(dropped) == 0.0
  loss = lambda f: (lambda *a: jnp.sum(f(a[0], idx, gates, *a[1:])[0] ** 2))
  g = jax.grad(loss(dispatch.experts_dense), argnums=(0, 1, 2, 3))(x, *ws)
  g_ref = jax.grad(loss(dispatch.experts_reference), argnums=(0, 1, 2, 3))(x, *ws)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert dispatch.dense_is_cheaper(2, 8, 64, 32, 4)            # the bench's drafter
  assert not dispatch.dense_is_cheaper(X * 8, 8, 64, 32, 4)     # training batches
  assert not dispatch.dense_is_cheaper(1, 16, 128, 64, 4)       # config.small: 1.5 MiB
  assert not dispatch.dense_is_cheaper(1, 256, 7168, 2048, 2)   # V3


def test_dropless_never_drops_skewed_routing():
  bias = np.zeros(8, np.float32)
  bias[[0, 1, 2]] = 100.0  # every token picks experts 0, 1, 2
  u = _inputs(CFG, seed=9)
  p = _params(CFG, seed=9)
  y_ref, stats_ref = ref.moe(_np(p), u, bias, CFG, VALID)
  np.testing.assert_array_equal(stats_ref["load_E"], [VALID.sum()] * 3 + [0] * 5)
  for kw in (dict(moe_dispatch="dropless"), dict(moe_dispatch="dropless", moe_block_size=2),
             dict(moe_dispatch="dropless", moe_block_size=3), dict(moe_dispatch="ragged")):
    cfg = CFG.replace(**kw)
    y, stats = _apply(cfg)(p, u, bias, VALID)
    assert float(stats.dropped) == 0.0
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    _assert_stats(stats, stats_ref)
  # The capacity path, at its default factor, must drop here: C = ceil(1.25*16*3/8) = 8
  # slots for VALID.sum() = 13 tokens on each of the three experts.
  cfg = CFG.replace(moe_dispatch="capacity")
  _, stats = _apply(cfg)(p, u, bias, VALID)
  assert float(stats.dropped) == 3 * (VALID.sum() - 8)


@pytest.mark.parametrize("norm", [True, False])
def test_bias_steers_selection_never_values(norm):
  """The bias may change WHICH experts run, never what they compute: a uniform bias c
  (which changes no top-K and no group score ranking) gives exactly the bias-0 output,
  statistics and gradients. Gates computed from s + b would move every gate (and the
  router's gradient) by c; a bias reaching the stats' P_i would move aux_prob."""
  cfg = CFG.replace(moe_dispatch="dropless", norm_topk_prob=norm)
  p = _params(cfg, seed=10)
  u = _inputs(cfg, seed=10)
  r = np.random.default_rng(11).standard_normal((B, T, cfg.d_model)).astype(np.float32)

  def loss(p, bias):
    y, stats = moe.MoE(cfg).apply({"params": p}, u, bias, VALID)
    return jnp.sum(y * r) + jnp.sum(stats.aux_prob_BE) + jnp.sum(stats.aux_score_BE), stats

  run = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l0, s0), g0 = run(p, jnp.zeros(8))
  (lc, sc), gc = run(p, jnp.full((8,), 0.7))
  np.testing.assert_allclose(lc, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), sc, s0)
  assert np.abs(g0["w_router"]).max() > 1e-3
  for key in g0:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                                                         err_msg=key), gc[key], g0[key])
  # A non-uniform bias does change the selection, and so the output.
  bias = jnp.asarray(np.random.default_rng(10).standard_normal(8) * 0.3, jnp.float32)
  (lb, sb), _ = run(p, bias)
  assert abs(float(lb) - float(l0)) > 1e-3
  assert not np.array_equal(np.asarray(sb.load_E), np.asarray(s0.load_E))


def test_megablox_kernels_match_ragged_dot_with_dead_rows():
  """megablox's gmm (and its VJP's gmm and tgmm) in Pallas' interpreter against
  jax.lax.ragged_dot: groups of 50, 0, 70 and 30 rows of a 256-row buffer (tiles of 128:
  groups start and end inside tiles, one is empty, 106 rows are dead). On the live rows
  the outputs and the input gradient agree, and so does the weight gradient (which sums
  over rows): dead rows (undefined in the kernel's output) never reach it."""
  M, K, N = 256, 128, 128
  sizes = jnp.array([50, 0, 70, 30], jnp.int32)
  live = np.arange(M) < int(sizes.sum())
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
  w = jnp.asarray(0.1 * rng.standard_normal((4, K, N)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((M, N)) * live[:, None], jnp.float32)

  def loss(impl, interpret):
    def f(x, w):
      y = dispatch.grouped_matmul(x, w, sizes, impl, interpret=interpret)
      y = jnp.where(jnp.asarray(live)[:, None], y, 0.0)
      return jnp.sum(y * ct), y
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)

  (_, y0), (dx0, dw0) = loss("xla", False)
  (_, y1), (dx1, dw1) = loss("megablox", True)
  np.testing.assert_allclose(y1[live], y0[live], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx1[live], dx0[live], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-5)
  assert dispatch.megablox_tiling(M, K, N, 4) == (128, 128, 128)


@pytest.mark.parametrize("m,groups,tm,rows", [(20480, 4, 512, 20480), (1280, 4, 256, 1280),
                                              (300, 4, 128, 384), (40, 2, 48, 48)])
def test_megablox_row_tiles_fit_the_groups(m, groups, tm, rows):
  """Row tiles as large as a group's share allows (a group runs whole tiles), and the
  buffer padded to them: the 671B's receive buffer, the guard config's, small ones."""
  assert dispatch.grouped_rows(m, "megablox", groups) == rows
  assert dispatch.megablox_row_tile(rows, groups) == tm
  assert rows % tm == 0
