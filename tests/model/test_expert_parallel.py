"""Expert parallelism on 8 simulated CPU devices: the all-to-all layer equals the
single-device layer (outputs, gradients, statistics, bias update) with the dropless and
the ragged local dispatch, node-limited routing keeps every token on at most topk_group
shards, capacity drops (send buffers, capped ragged buffers) match a numpy count, and
with ep_overflow="rounds" the same small buffers drop nothing: outputs and gradients
equal one device's, in as many rounds as the longest queue needs.
(Training on a data=2 x expert=4 mesh against one device: tests/test_train.py.)"""

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax import balancing
from deepseek_jax.bench import expert_traffic
from deepseek_jax.model import config, expert_parallel, moe, padded_exchange, ragged_exchange
from deepseek_jax.model import dispatch as dispatch_mod
from deepseek_jax.train import sharding

B, T = 8, 4        # one sequence per batch shard
CFG = config.tiny()  # E=8 in 4 groups of 2, keep 2 groups, top-3, sigmoid, scale 2.5
VALID = np.ones((B, T), bool)
VALID[0, 3:] = False
VALID[5, :2] = False
MESHES = [(1, 8), (2, 4), (4, 2)]  # data x expert


def _mesh(data, expert, fsdp=1, tensor=1):
  return sharding.make_mesh(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor),
                            jax.devices()[:8])


def _params(cfg, seed=0):
  shapes = jax.eval_shape(moe.MoE(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 2, cfg.d_model)), jnp.zeros((cfg.n_routed_experts,)))
  return jax.tree.map(jnp.asarray, ref.randomize(nn.unbox(shapes)["params"], seed, std=0.25))


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)
  bias = 0.3 * rng.standard_normal(cfg.n_routed_experts).astype(np.float32)
  return u, bias


@functools.lru_cache(maxsize=None)
def _loss_and_grads(cfg):
  """jit of (layer outputs, stats, grads wrt params and inputs) of a fixed linear loss."""
  def loss(p, u, bias, valid, ct):
    y, stats = moe.MoE(cfg).apply({"params": p}, u, bias, valid)
    return jnp.sum(y * ct), (y, stats)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _run(cfg, mesh, seed=0):
  u, bias = _inputs(cfg, seed)
  ct = np.random.default_rng(seed + 1).standard_normal(u.shape).astype(np.float32)
  args = (_params(cfg, seed), u, bias, VALID, ct)
  if mesh is None:
    return _loss_and_grads(cfg)(*args)
  with jax.set_mesh(mesh):
    return _loss_and_grads(cfg)(*args)


def _assert_matches_single_device(cfg_one, cfg, mesh):
  """cfg on the mesh gives cfg_one's outputs, gradients and statistics on one device."""
  (_, (y0, s0)), g0 = _run(cfg_one, None)
  (_, (y1, s1)), g1 = _run(cfg, mesh)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  # Gradients wrt the inputs and every weight (routed experts, router, shared experts).
  flat0, flat1 = jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)
  for (path, a), b in zip(flat0, flat1):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for name in ("load_E", "aux_count_BE", "aux_prob_BE", "aux_score_BE", "n_tokens_B",
               "dropped"):
    np.testing.assert_allclose(getattr(s1, name), getattr(s0, name), rtol=1e-5, atol=1e-5,
                               err_msg=name)
  assert float(s1.dropped) == 0.0
  assert float(s0.shards_per_token) == 1.0
  assert 1.0 < float(s1.shards_per_token) <= float(s1.max_shards_per_token) <= cfg.top_k


@pytest.mark.parametrize("mesh", [dict(data=d, expert=e) for d, e in MESHES]
                         + [dict(data=1, fsdp=2, expert=2, tensor=2)])
def test_matches_single_device(mesh):
  # The last mesh: expert weights gathered over fsdp and tensor, tokens replicated over
  # tensor (the counts must not be summed over it).
  _assert_matches_single_device(CFG, CFG, _mesh(**mesh))


@pytest.mark.parametrize("data,expert,factor", [(1, 8, None), (2, 4, 2.0)])
def test_ragged_matches_single_device_reference(data, expert, factor):
  """The grouped-matmul local path, against the one-device reference path. None: no
  cap (and one expert a shard, J = 1). 2.0: full send buffers (C = X) but a live local
  cap, ceil(2 X K) = 24 of W J = 32 rows, that this routing happens to fit."""
  cfg = CFG.replace(moe_dispatch="ragged", ep_capacity_factor=factor)
  X = B * T // 8
  if factor is not None:
    C = padded_exchange.shard_capacity(X, cfg, expert)
    J = min(cfg.top_k, cfg.n_routed_experts // expert)
    assert C == X and padded_exchange.local_rows(X, cfg, expert * C * J) == 24 < expert * C * J
  _assert_matches_single_device(CFG.replace(moe_dispatch="reference"), cfg,
                                _mesh(data, expert))


def test_bias_update_is_global():
  """The balancing update inside the step sees the loads of all 8 shards, not one (and
  Quantile Balancing's target is the whole batch's quantile)."""
  cfg = CFG.replace(moe_dispatch="capacity", capacity_factor=1.0,  # drops too
                    quantile_stats=True, n_group=1, topk_group=1)  # QB: plain top-K
  u, bias = _inputs(cfg, seed=3)
  p = _params(cfg, seed=3)

  @jax.jit
  def step(p, u, bias, valid):
    _, stats = moe.MoE(cfg).apply({"params": p}, u, bias, valid)
    new = {rule: balancing.update_bias(bias[None], stats.load_E[None], 1e-3, rule,
                                       stats.quantile_target_E[None])[0]
           for rule in balancing.BIAS_RULES}
    return new, stats.load_E, stats.dropped, stats.quantile_target_E

  want, load0, _, _ = step(p, u, bias, VALID)
  with jax.set_mesh(_mesh(2, 4)):
    got, load1, dropped, target1 = step(p, u, bias, VALID)
  np.testing.assert_array_equal(load1, load0)
  # Against the numpy layer routing every token (not either run's own stats): the
  # expert-parallel step's loads and Quantile Balancing's target of the whole batch.
  _, stats = ref.moe(jax.tree.map(np.asarray, p), u, bias, cfg, VALID)
  np.testing.assert_array_equal(load1, stats["load_E"])
  np.testing.assert_allclose(target1, ref.quantile_target(
      stats["scores_XE"], np.asarray(bias), stats["valid_X"], cfg.top_k), atol=1e-5)
  mean = stats["load_E"].mean()
  clear = np.abs(stats["load_E"] - mean) > 0.5
  np.testing.assert_allclose(np.asarray(got["sign"])[clear],
                             (np.asarray(bias) + 1e-3 * np.sign(mean - stats["load_E"]))[clear],
                             atol=1e-7)
  for rule in balancing.BIAS_RULES:
    np.testing.assert_allclose(got[rule], want[rule], atol=1e-7, err_msg=rule)
  assert float(load1.sum()) == cfg.top_k * VALID.sum()
  assert float(dropped) > 0  # loads count routed assignments, kept or dropped
  # One shard's own count would move the bias differently.
  local, _, _, _ = step(p, u[:1], bias, VALID[:1])
  assert not np.allclose(local["magnitude"], want["magnitude"])


def _shards_per_token(cfg, p, u, bias, n_shards):
  scores = ref.affinities(np.asarray(u, np.float64).reshape(-1, cfg.d_model)
                          @ np.asarray(p["w_router"], np.float64), cfg.score_func)
  chosen, _ = ref.route(scores, bias, cfg)
  per = cfg.n_routed_experts // n_shards
  return np.array([len({e // per for e in c}) for c in chosen]).reshape(B, T)


@pytest.mark.parametrize("data,expert,M", [(2, 4, 2), (4, 2, 1)])
def test_node_limited_routing_visits_at_most_topk_group_shards(data, expert, M):
  # M = topk_group < shards, else the bound says nothing; 4 groups of 2 experts.
  cfg = CFG.replace(route_limit_by_shard=True, topk_group=M, top_k=min(3, 2 * M))
  (_, (_, stats)), _ = _run(cfg, _mesh(data, expert), seed=4)
  u, bias = _inputs(cfg, seed=4)
  counts = _shards_per_token(cfg, _params(cfg, seed=4), u, bias, expert)[VALID]
  assert counts.max() <= M
  assert float(stats.max_shards_per_token) == counts.max()
  np.testing.assert_allclose(float(stats.shards_per_token), counts.mean(), rtol=1e-6)
  # What the dispatch actually sends: one row per (token, shard) pair, at most M a token.
  scores = moe.affinities(jnp.asarray(u).reshape(B * T, -1) @ _params(cfg, seed=4)["w_router"],
                          cfg)
  idx, gates = moe.route(scores, jnp.asarray(bias), cfg)
  rank_XZ = padded_exchange.queue_pairs(idx, gates, cfg.n_routed_experts, expert)[0]
  row_XZ = padded_exchange.round_rows(rank_XZ, B * T)
  sent = (row_XZ < expert * B * T).sum(-1)[VALID.reshape(-1)]
  np.testing.assert_array_equal(sent, counts)
  # Without the group limit the same tokens spread over more than M shards.
  free = cfg.replace(n_group=1, topk_group=1, route_limit_by_shard=False)
  assert _shards_per_token(free, _params(cfg, seed=4), u, bias, expert)[VALID].max() > M


def test_route_limit_rejects_a_mesh_that_splits_groups():
  cfg = CFG.replace(route_limit_by_shard=True)  # 4 groups cannot sit on 8 shards
  with pytest.raises(ValueError, match="route_limit_by_shard: n_group=4 must be a multiple"):
    _run(cfg, _mesh(1, 8))


def _numpy_expert_parallel(cfg, p, u, bias, Z, C, n_rows=None):
  """(y [X, D], send drops, local drops) of the layer on a (8 / Z) x Z data x expert mesh.

  A token goes once to each shard holding any of its experts; each source shard has C
  slots per destination, taken in token order; a token refused by a full destination
  loses all its experts there. Shard (d, z) receives from (d, 0..Z-1) in that order,
  each source's rows in slot order. With n_rows, it then keeps the first n_rows of those
  assignments stably sorted by expert; the rest is dropped."""
  pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  u_XD = np.asarray(u, np.float64).reshape(-1, cfg.d_model)
  scores = ref.affinities(u_XD @ pn["w_router"], cfg.score_func)
  chosen, gates = ref.route(scores, bias, cfg)
  X_shard, per = B * T // 8, cfg.n_routed_experts // Z
  sh = pn["shared"]
  y = np.stack([ref.swiglu(u_D, sh["w_gate"], sh["w_up"], sh["w_down"]) for u_D in u_XD])
  received = {}  # (d, z) -> [(expert, token, gate)] in receive-buffer order
  send_dropped = 0
  for src in range(8):
    used = np.zeros(Z, int)
    for x in range(src * X_shard, (src + 1) * X_shard):
      if not VALID.reshape(-1)[x]:
        continue
      for z in sorted({e // per for e in chosen[x]}):
        there = [(e, x, g) for e, g in zip(chosen[x], gates[x]) if e // per == z]
        used[z] += 1
        if used[z] > C:
          send_dropped += len(there)
        else:
          received.setdefault((src // Z, z), []).extend(there)
  local_dropped = 0
  for rows in received.values():
    rows = sorted(rows, key=lambda r: r[0])  # stable
    keep = len(rows) if n_rows is None else n_rows
    local_dropped += len(rows[keep:])
    for e, x, g in rows[:keep]:
      y[x] += g * ref.swiglu(u_XD[x], pn["w_gate"][e], pn["w_up"][e], pn["w_down"][e])
  return y, send_dropped, local_dropped


def test_capacity_drops_match_numpy_count():
  data, Z = 2, 4
  cfg = CFG.replace(moe_dispatch="capacity", capacity_factor=1.0)
  p, (u, bias) = _params(cfg, seed=5), _inputs(cfg, seed=5)
  (_, (y, stats)), _ = _run(cfg, _mesh(data, Z), seed=5)
  fanout = cfg.topk_group  # 4 groups on 4 shards: node-limited
  C = math.ceil(cfg.capacity_factor * (B * T // 8) * fanout / Z)
  y_want, dropped, _ = _numpy_expert_parallel(cfg, p, u, bias, Z, C)
  assert dropped > 0
  assert float(stats.dropped) == dropped
  np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), y_want, rtol=1e-5,
                             atol=1e-5)


def test_ragged_capacity_drops_match_numpy_count():
  """ep_capacity_factor f caps both buffers: C = ceil(f X fanout / Z) send rows per
  destination and ceil(f X K) local rows; both kinds of drop are summed in `dropped`."""
  data, Z, f = 2, 4, 0.75
  cfg = CFG.replace(moe_dispatch="ragged", ep_capacity_factor=f, ep_overflow="drop")
  p, (u, bias) = _params(cfg, seed=5), _inputs(cfg, seed=5)
  (_, (y, stats)), _ = _run(cfg, _mesh(data, Z), seed=5)
  X = B * T // 8
  C = math.ceil(f * X * cfg.topk_group / Z)
  n_rows = math.ceil(f * X * cfg.top_k)
  assert (C, n_rows) == (2, 9)
  assert padded_exchange.shard_capacity(X, cfg, Z) == C
  assert padded_exchange.local_rows(X, cfg, Z * C * 2) == n_rows
  y_want, send_dropped, local_dropped = _numpy_expert_parallel(cfg, p, u, bias, Z, C, n_rows)
  assert send_dropped > 0 and local_dropped > 0
  assert float(stats.dropped) == send_dropped + local_dropped
  np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), y_want, rtol=1e-5,
                             atol=1e-5)


def _skewed_routing(X_all, K, E, seed, hot):
  """Chosen experts [X_all, K] where every token's first pick is one of the `hot` experts
  (all on shard 0 when hot <= E / Z), the rest distinct and random, and a few padding
  tokens (expert id E); gates in (0, 1)."""
  rng = np.random.default_rng(seed)
  idx = np.empty((X_all, K), np.int32)
  for x in range(X_all):
    first = rng.integers(hot)
    rest = rng.permutation([e for e in range(E) if e != first])[:K - 1]
    idx[x] = [first, *rest]
  idx[::7] = E
  gates = rng.uniform(0.1, 1.0, (X_all, K)).astype(np.float32)
  return idx, gates


def _exchange_vs_reference(cfg, data, expert, idx, gates, exact=True):
  """The expert-parallel layer's routed sum for fixed routing idx/gates on a data x
  expert mesh against experts_reference on one device. exact: y and the gradients wrt
  x, gates and the three weights must agree, nothing dropped, the loads a bincount;
  returns what the exchange sends (bench/expert_traffic.py: rows, bytes, rounds; with
  exact=False: (y, reference y, dropped, traffic))."""
  D, X_all = cfg.d_model, idx.shape[0]
  Bt, Tt = 8, X_all // 8
  p = _params(cfg, seed=3)
  ws = (p["w_gate"], p["w_up"], p["w_down"])
  rng = np.random.default_rng(4)
  x = rng.standard_normal((X_all, D)).astype(np.float32)
  ct = rng.standard_normal((X_all, D)).astype(np.float32)

  def loss_ref(x, gates, *ws):
    y, _ = dispatch_mod.experts_reference(x, idx, gates, *ws)
    return jnp.sum(y * ct), y

  (_, y0), g0 = jax.value_and_grad(loss_ref, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      x, gates, *ws)
  mesh = _mesh(data, expert)
  shape = lambda a: a.reshape(Bt, Tt, *a.shape[1:])

  def loss(x, gates, *ws):
    y, load, dropped = expert_parallel.routed_experts(
        shape(x), shape(idx), shape(gates), *ws, cfg, mesh)
    y = y.reshape(X_all, D)
    return jnp.sum(y * ct), (y, load, dropped)

  with jax.set_mesh(mesh):
    (_, (y1, load, dropped)), g1 = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, gates, *ws)
    tr = jax.jit(lambda x, i, g: expert_traffic.exchange_traffic(x, i, g, cfg, mesh))(
        shape(x), shape(idx), shape(gates))
  if not exact:
    return y1, y0, dropped, tr
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for name, a, b in zip(("x", "gates", "w_gate", "w_up", "w_down"), g0, g1):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)
  assert float(dropped) == 0.0
  E = cfg.n_routed_experts
  np.testing.assert_array_equal(load, np.bincount(idx[idx < E], minlength=E))
  return tr


@pytest.mark.parametrize("data,expert,f,dispatch_name", [
    (2, 4, 0.25, "ragged"), (1, 8, 0.5, "dropless"), (4, 2, 0.3, "ragged")])
def test_rounds_send_every_pair_and_match_one_device(data, expert, f, dispatch_name):
    """Buffers far smaller than the skewed load (every token has an expert on shard 0):
    with ep_overflow="rounds" nothing is dropped, y and the gradients wrt x, gates and
    every expert weight equal experts_reference on one device, and the rounds run are
    the longest (source, destination) queue over C, counted here in numpy. The same
    buffers with "drop" lose assignments (so the rounds are really needed)."""
    # Routing without groups, so a token may reach min(K, Z) shards (the fan-out bound).
    cfg = CFG.replace(moe_dispatch=dispatch_name, ep_capacity_factor=f, n_group=1,
                      topk_group=1)
    E, K, Z = cfg.n_routed_experts, cfg.top_k, expert
    X_all, X = 128, 128 // 8
    idx, gates = _skewed_routing(X_all, K, E, seed=expert, hot=E // Z)
    C = math.ceil(f * X * padded_exchange.max_fanout(cfg, Z) / Z)
    assert padded_exchange.shard_capacity(X, cfg, Z) == C < X
    # numpy: pairs per (source shard, destination), in tokens with an expert there.
    per = E // Z
    queues = np.zeros((8, Z), int)
    for x_i in range(X_all):
      for z in {int(e) // per for e in idx[x_i] if e < E}:
        queues[x_i // X, z] += 1
    want_rounds = math.ceil(queues.max() / C)
    assert want_rounds >= 3
    tr = _exchange_vs_reference(cfg, data, expert, idx, gates)
    assert int(tr["rounds"]) == want_rounds
    y2, y0, dropped2, tr2 = _exchange_vs_reference(cfg.replace(ep_overflow="drop"), data,
                                                   expert, idx, gates, exact=False)
    assert float(dropped2) > 0 and int(tr2["rounds"]) == 1
    assert not np.allclose(y2, y0, rtol=1e-3, atol=1e-3)


def test_moe_layer_in_rounds_matches_single_device():
  """The whole layer (router, shared experts, statistics) with send buffers of one row
  per destination: the rounds make it dropless, so it equals one device."""
  cfg = CFG.replace(moe_dispatch="ragged", ep_capacity_factor=0.5)
  assert padded_exchange.shard_capacity(B * T // 8, cfg, 4) == 1
  assert padded_exchange.uses_rounds(cfg, B * T // 8, 4)
  _assert_matches_single_device(CFG.replace(moe_dispatch="reference"), cfg, _mesh(2, 4))


# The ragged exchange (ep_exchange="ragged") -------------------------------------------

def _numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets,
                             recv_sizes):
  """jax.lax.ragged_all_to_all's documented semantics over Z shards, in numpy (per shard
  lists): shard s sends operand[s][input_offsets[s][j] : + send_sizes[s][j]] to shard j,
  written at output_offsets[s][j] of j's output; recv_sizes[j][s] must equal that size."""
  Z = len(operands)
  results = [np.array(o, copy=True) for o in outputs]
  for s in range(Z):
    for j in range(Z):
      n = send_sizes[s][j]
      assert recv_sizes[j][s] == n
      start = output_offsets[s][j]
      results[j][start:start + n] = operands[s][input_offsets[s][j]:input_offsets[s][j] + n]
  return results


def test_padded_stand_in_has_ragged_all_to_all_semantics():
  """XLA:CPU lacks ragged_all_to_all; the stand-in the CPU tests run (a padded all_to_all
  and a scatter) gives the numpy model's result on 8 shards, rows nobody writes keeping
  `output`'s values, and its gradient is the transposed exchange (checked against
  numpy's: the cotangent of a sent row is the cotangent of where it landed)."""
  from deepseek_jax.model import ragged_a2a
  Z, n_in, n_out, D, max_rows = 8, 18, 20, 3, 2
  rng = np.random.default_rng(0)
  send = rng.integers(0, 3, (Z, Z))            # rows shard s sends to shard j (<= 2)
  in_off = np.zeros((Z, Z), int)
  out_off = np.zeros((Z, Z), int)
  for s in range(Z):                            # s's slices laid out in order, one gap
    in_off[s] = np.concatenate([[1], 1 + np.cumsum(send[s])[:-1]])
  for j in range(Z):                            # j's received slices, from source 0 up
    starts = np.concatenate([[0], np.cumsum(send[:, j])[:-1]])
    out_off[:, j] = starts
  operand = rng.standard_normal((Z, n_in, D)).astype(np.float32)
  output = rng.standard_normal((Z, n_out, D)).astype(np.float32)
  want = _numpy_ragged_all_to_all(operand, output, in_off, send, out_off, send.T)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("z",))

  def run(op, out, a, b, c, d):
    return ragged_a2a.padded_all_to_all(op[0], out[0], a[0], b[0], c[0], d[0],
                                        axis_name="z", max_rows=max_rows)[None]

  fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(PSz,) * 6, out_specs=PSz))
  args = (operand, output, in_off.astype(np.int32), send.astype(np.int32),
          out_off.astype(np.int32), send.T.copy().astype(np.int32))
  np.testing.assert_array_equal(np.asarray(fn(*args)), np.stack(want))
  ct = rng.standard_normal((Z, n_out, D)).astype(np.float32)
  g_op, g_out = jax.grad(lambda o, u: jnp.sum(fn(o, u, *args[2:]) * ct), argnums=(0, 1))(
      operand, output)
  want_op = np.zeros_like(operand)
  want_out = ct.copy()
  for s in range(Z):
    for j in range(Z):
      n, a, c = send[s, j], in_off[s, j], out_off[s, j]
      want_op[s, a:a + n] = ct[j, c:c + n]
      want_out[j, c:c + n] = 0.0
  np.testing.assert_allclose(g_op, want_op)
  np.testing.assert_allclose(g_out, want_out)


PSz = jax.sharding.PartitionSpec("z")


def _ragged_cfg(f):
  return CFG.replace(moe_dispatch="ragged", ep_capacity_factor=f, n_group=1, topk_group=1,
                     ep_exchange="ragged")


def _destination_totals(idx, E, data, expert):
  """[data, expert]: assignments each destination shard receives (numpy)."""
  X = idx.shape[0] // (data * expert)
  per = E // expert
  tot = np.zeros((data, expert), int)
  for x_i, row in enumerate(idx):
    for e in row[row < E]:
      tot[(x_i // X) // expert, e // per] += 1
  return tot


@pytest.mark.parametrize("data,expert,f,grouped", [
    (2, 4, 0.5, "xla"), (1, 8, 0.25, "megablox"), (4, 2, 0.3, "xla")])
def test_ragged_exchange_is_exact_and_rounds_follow_destination_totals(data, expert, f,
                                                                       grouped):
  """Skewed routing (every token's first pick on shard 0) into receive buffers far below
  shard 0's total: nothing dropped, y and every gradient equal experts_reference on one
  device, and the rounds are the fullest destination's total over its buffer, counted
  here in numpy. megablox on CPU runs jax.lax.ragged_dot with the kernel's padding."""
  cfg = _ragged_cfg(f).replace(grouped_matmul=grouped)
  E, K, Z = cfg.n_routed_experts, cfg.top_k, expert
  idx, gates = _skewed_routing(128, K, E, seed=expert, hot=E // Z)
  X = 128 // 8
  cap = ragged_exchange.receive_rows(X, cfg, Z)
  want = math.ceil(_destination_totals(idx, E, data, expert).max() / cap)
  assert want >= 3
  tr = _exchange_vs_reference(cfg, data, expert, idx, gates)
  assert int(tr["rounds"]) == want


def test_one_long_queue_is_one_round_when_no_destination_overflows():
  """Every shard sends all its assignments to ONE destination, each a different one (a
  permutation): one source's queue is 4x the padded exchange's per-destination buffer C,
  which took ceil(queue / C) rounds, but no destination receives more than its buffer,
  so the ragged exchange needs one round."""
  data, Z = 2, 4
  cfg = _ragged_cfg(1.0).replace(top_k=2)
  E, K = cfg.n_routed_experts, cfg.top_k
  X_all, X = 128, 16
  per = E // Z
  idx = np.empty((X_all, K), np.int32)
  for x_i in range(X_all):
    shard = x_i // X
    dest = (shard % Z + 1) % Z                  # shard s -> destination s + 1 (mod Z)
    idx[x_i] = [dest * per, dest * per + 1]
  gates = np.random.default_rng(0).uniform(0.1, 1.0, (X_all, K)).astype(np.float32)
  assert _destination_totals(idx, E, data, Z).max() == X * K
  assert ragged_exchange.receive_rows(X, cfg, Z) == X * K        # exactly one round
  C = padded_exchange.shard_capacity(X, cfg.replace(ep_exchange="padded"), Z)
  assert math.ceil(X / C) >= 2                  # the padded exchange's rounds
  tr = _exchange_vs_reference(cfg, data, Z, idx, gates)
  assert int(tr["rounds"]) == 1
  # Only live rows travel: every assignment leaves its shard, out and back.
  assert float(tr["payload_rows"]) == X_all * K


def test_moe_layer_through_the_ragged_exchange_matches_single_device():
  """The whole layer (router, shared experts, statistics) with a half-size receive
  buffer: rounds keep it dropless, so it equals one device."""
  cfg = CFG.replace(moe_dispatch="ragged", ep_capacity_factor=0.5, ep_exchange="ragged")
  _assert_matches_single_device(CFG.replace(moe_dispatch="reference"), cfg, _mesh(2, 4))


def test_megablox_without_an_expert_axis_runs_per_batch_shard():
  """grouped_matmul="megablox" on a data-parallel mesh: a Pallas kernel cannot be
  partitioned by GSPMD, so each batch shard runs its own grouped matmul in a shard_map;
  the layer equals one device's."""
  cfg = CFG.replace(moe_dispatch="ragged", grouped_matmul="megablox")
  (_, (y0, s0)), g0 = _run(CFG.replace(moe_dispatch="reference"), None)
  (_, (y1, s1)), g1 = _run(cfg, _mesh(8, 1))
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s1.load_E, s0.load_E)
