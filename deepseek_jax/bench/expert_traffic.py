"""The expert-parallel MoE layer measured on simulated CPU devices: what its all-to-all
exchange sends, and its time against one device (experiments/bench_expert_parallel.py).

For each data x expert mesh and each buffer setting (dropless, C = tokens; rounds:
C = ceil(f X fanout / S) and the overflow sent in further rounds; capacity: the same C,
overflow dropped) a row holds:
  - bytes the dispatch all-to-all moves off each shard per token, counted from the
    exchanged buffers (occupied rows), against the analytic K * D * itemsize * (S-1)/S
    (one row per routed assignment, uniform routing) and against the exact expectation
    of this dispatch (one row per distinct off-shard destination of a token);
  - wire bytes per token: every padded buffer row leaving a shard, dispatch and combine
    plus the expert ids and gates that travel with the rows;
  - time per MoE layer (forward, and forward + backward) on the mesh against the same
    layer on one device. The simulated devices share the host's cores, so the ratio
    shows the dispatch overhead, not a speed-up.

The counts are recounted from the routing with the layer's own plan
(model/padded_exchange.py: queue_pairs, shard_capacity, rounds_needed; model/
ragged_exchange.py: receive_rows), so the model's program carries no counters.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as PS

from deepseek_jax.model import config, expert_parallel as ep, moe, ragged_a2a
from deepseek_jax.model import padded_exchange as padded, ragged_exchange as ragged
from deepseek_jax.model.partitioning import BATCH, EXPERT
from deepseek_jax.train import sharding


# What the exchange sends ---------------------------------------------------------------

def _ragged_counts(idx_XK, cfg, n_shards: int, D: int, itemsize: int, token_axes):
  """(counts, rounds) of one shard of the ragged exchange: only live rows travel, one
  per assignment, each out and back with its expert id."""
  X = idx_XK.shape[0]
  E, Z = cfg.n_routed_experts, n_shards
  e_A = idx_XK.reshape(-1)
  dest_A = jnp.where(e_A < E, e_A // (E // Z), Z)  # as ragged_exchange.ragged_experts
  counts_Z = jnp.zeros((Z + 1,), jnp.int32).at[dest_A].add(1)[:Z]
  counts_SD = jax.lax.all_gather(counts_Z, EXPERT)
  cap = ragged.receive_rows(X, cfg, Z)
  n_rounds = jax.lax.pmax(ragged_a2a.rounds_needed(counts_SD, cap), token_axes)
  me = jax.lax.axis_index(EXPERT)
  sent = jnp.sum(jnp.where(jnp.arange(Z) != me, counts_Z, 0)).astype(jnp.float32)
  return {"payload_rows": sent, "wire_bytes": sent * (2 * D * itemsize + 4)}, n_rounds


def _padded_counts(idx_XK, gates_XK, cfg, n_shards: int, D: int, itemsize: int,
                   token_axes):
  """(counts, rounds) of one shard of the padded exchange: [Z, C] buffers every round."""
  X = idx_XK.shape[0]
  Z = n_shards
  C = padded.shard_capacity(X, cfg, Z)
  E = cfg.n_routed_experts
  rank_XZ, ids_XZJ, gates_XZJ, _ = padded.queue_pairs(idx_XK, gates_XK, E, Z)
  J = ids_XZJ.shape[-1]
  rounds = padded.uses_rounds(cfg, X, Z)
  n_rounds = (jax.lax.pmax(padded.rounds_needed(rank_XZ, C), token_axes) if rounds
              else jnp.ones((), jnp.int32))
  me = jax.lax.axis_index(EXPERT)
  sent_XZ = (rank_XZ >= 0) & ((rank_XZ < C) | rounds)
  leaving_Z = jnp.arange(Z) != me
  counts = {
      # occupied token rows that leave the shard, dispatch direction
      "payload_rows": jnp.sum(sent_XZ & leaving_Z[None, :]).astype(jnp.float32),
      # every buffer byte that leaves the shard, dispatch + combine, every round
      "wire_bytes": n_rounds.astype(jnp.float32) * (Z - 1) * C * (
          2 * D * itemsize + J * (4 + gates_XZJ.dtype.itemsize)),
  }
  return counts, n_rounds


def exchange_traffic(x_BTD, idx_BTK, gates_BTK, cfg, mesh) -> dict:
  """What expert_parallel.routed_experts(x_BTD, idx_BTK, gates_BTK, ..., cfg, mesh) sends
  over the expert axis, summed over shards: payload_rows (occupied token rows leaving
  their shard, dispatch direction), wire_bytes (every byte leaving a shard, dispatch and
  combine, every round) and rounds (the rounds run). Call it under jit; x_BTD gives the
  row width and dtype only."""
  ep.check_mesh(cfg, mesh, x_BTD.shape[0])
  Z = mesh.shape[EXPERT]
  seq_axes = ep.sequence_axes(mesh, x_BTD.shape[1])
  token_axes = BATCH + seq_axes
  D, itemsize = x_BTD.shape[-1], x_BTD.dtype.itemsize

  def per_shard(idx_BTK, gates_BTK):
    B, T, K = idx_BTK.shape
    idx_XK, gates_XK = idx_BTK.reshape(B * T, K), gates_BTK.reshape(B * T, K)
    if cfg.ep_exchange == "ragged":
      counts, n_rounds = _ragged_counts(idx_XK, cfg, Z, D, itemsize, token_axes)
    else:
      counts, n_rounds = _padded_counts(idx_XK, gates_XK, cfg, Z, D, itemsize, token_axes)
    counts = jax.tree.map(lambda v: jax.lax.psum(v, token_axes), counts)
    return dict(counts, rounds=n_rounds.astype(jnp.float32))

  tokens = PS(BATCH, seq_axes or None, None)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(tokens, tokens),
                       out_specs={"payload_rows": PS(), "wire_bytes": PS(),
                                  "rounds": PS()})(idx_BTK, gates_BTK)


# The benchmark -------------------------------------------------------------------------

def median_time(fn, args, repeats: int) -> float:
  """Seconds of fn(*args): the middle of `repeats` timed calls after one warm-up call."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def _layer(cfg, bias_E):
  """jit of the MoE layer's output, and of its gradients wrt params and input."""
  def fwd(p, x):
    return moe.MoE(cfg).apply({"params": p}, x, bias_E)[0]

  def fwd_bwd(p, x):
    return jax.grad(lambda p, x: jnp.sum(fwd(p, x).astype(jnp.float32) ** 2),
                    argnums=(0, 1))(p, x)
  return jax.jit(fwd), jax.jit(fwd_bwd)


class Problem(NamedTuple):
  """One MoE layer, its input and its routing (the same on every mesh)."""
  base: object                # the preset's ModelConfig
  params: dict
  x_BTD: jax.Array
  idx_XK: jax.Array
  gates_XK: jax.Array


def problem(preset: str, dtype: str, tokens: int, seq: int) -> Problem:
  """The preset's MoE layer at random weights on `tokens` random tokens, routed."""
  base = config.preset(preset, dtype=dtype)
  D, E = base.d_model, base.n_routed_experts
  B, T = tokens // seq, seq
  rng = np.random.default_rng(0)
  x_BTD = jnp.asarray(rng.standard_normal((B, T, D)), base.jnp_dtype)
  bias_E = jnp.zeros((E,), jnp.float32)
  params = nn.unbox(moe.MoE(base).init(jax.random.PRNGKey(0), x_BTD, bias_E))["params"]
  scores_XE = moe.affinities(x_BTD.reshape(B * T, D).astype(jnp.float32)
                             @ params["w_router"], base)
  idx_XK, gates_XK = moe.route(scores_XE, bias_E, base)
  return Problem(base, params, x_BTD, idx_XK, gates_XK)


def settings(capacity_factor: float) -> dict:
  """The buffer settings, as ModelConfig overrides."""
  return {"dropless": dict(moe_dispatch="dropless"),
          "rounds": dict(moe_dispatch="dropless", ep_capacity_factor=capacity_factor),
          "capacity": dict(moe_dispatch="capacity", capacity_factor=capacity_factor)}


def mesh_row(pb: Problem, mesh_name: str, setting: str, over: dict, single: tuple,
             repeats: int) -> dict:
  """One mesh ("DATAxEXPERT") and buffer setting: traffic per token, drops, rounds, and
  times against `single` (one device's forward and forward + backward seconds)."""
  base, params, x_BTD, idx_XK, gates_XK = pb
  B, T, D = x_BTD.shape
  X, K, E = B * T, base.top_k, base.n_routed_experts
  itemsize = x_BTD.dtype.itemsize
  data, S = (int(v) for v in mesh_name.split("x"))
  mesh = sharding.make_mesh(dict(data=data, fsdp=1, expert=S, tensor=1))
  # Token n of the batch lives on batch shard n // (X / 8); its expert-axis index is
  # that shard's index mod S (batch shards run over data, fsdp, expert).
  idx = np.asarray(idx_XK)
  src_X = (np.arange(X) // (X // (data * S))) % S
  dest_XK = idx // (E // S)
  off_shard_assign = (dest_XK != src_X[:, None]).mean()
  distinct_off = np.mean([len(set(d) - {s}) for d, s in zip(dest_XK, src_X)])
  cfg = base.replace(**over)
  ws = tuple(params[w].astype(base.jnp_dtype) for w in ("w_gate", "w_up", "w_down"))
  idx_BTK, gates_BTK = idx_XK.reshape(B, T, K), gates_XK.reshape(B, T, K)
  with jax.set_mesh(mesh):
    abstract = jax.sharding.get_abstract_mesh
    dropped = jax.jit(lambda x, i, g, wg, wu, wd: ep.routed_experts(
        x, i, g, wg, wu, wd, cfg, abstract())[2])(x_BTD, idx_BTK, gates_BTK, *ws)
    traffic = jax.jit(lambda x, i, g: exchange_traffic(x, i, g, cfg, abstract()))(
        x_BTD, idx_BTK, gates_BTK)
    fwd, fwd_bwd = _layer(cfg, jnp.zeros((E,), jnp.float32))
    t_fwd = median_time(fwd, (params, x_BTD), repeats)
    t_fwd_bwd = median_time(fwd_bwd, (params, x_BTD), repeats)
  return {
      "mesh": mesh_name, "setting": setting,
      "capacity_rows": padded.shard_capacity(X // (data * S), cfg, S),
      "dropped_frac": float(dropped) / (K * X),
      "payload_bytes_per_token": float(traffic["payload_rows"]) * D * itemsize / X,
      "analytic_bytes_per_token": K * D * itemsize * (S - 1) / S,
      "analytic_measured_fraction": K * D * itemsize * off_shard_assign,
      "expected_dedup_bytes_per_token": D * itemsize * distinct_off,
      "wire_bytes_per_token": float(traffic["wire_bytes"]) / X,
      "rounds": int(traffic["rounds"]),
      "ms_fwd": 1e3 * t_fwd, "ms_fwd_single": 1e3 * single[0],
      "ms_fwd_bwd": 1e3 * t_fwd_bwd, "ms_fwd_bwd_single": 1e3 * single[1],
  }


def format_row(r: dict) -> str:
  return (f"{r['mesh']} {r['setting']:8s} C={r['capacity_rows']:4d} x {r['rounds']} "
          f"round(s), dropped {100 * r['dropped_frac']:.2f}% | dispatch bytes/token: "
          f"measured {r['payload_bytes_per_token']:.0f}, analytic K*D*b*(S-1)/S "
          f"{r['analytic_bytes_per_token']:.0f} (at the measured off-shard fraction "
          f"{r['analytic_measured_fraction']:.0f}), expected with one row per "
          f"destination {r['expected_dedup_bytes_per_token']:.0f}; wire (padded, both "
          f"ways) {r['wire_bytes_per_token']:.0f} | ms fwd {r['ms_fwd']:.1f} vs "
          f"{r['ms_fwd_single']:.1f} one device, fwd+bwd {r['ms_fwd_bwd']:.1f} vs "
          f"{r['ms_fwd_bwd_single']:.1f}")


def run(meshes=("1x8", "2x4", "4x2"), tokens: int = 2048, seq: int = 64,
        dtype: str = "float32", capacity_factor: float = 1.25, repeats: int = 10,
        preset: str = "small", log=print) -> list[dict]:
  """The benchmark's rows, each logged as it is measured: every mesh ("DATAxEXPERT")
  with every buffer setting, on one routing of `tokens` random tokens (routing never
  depends on the mesh)."""
  pb = problem(preset, dtype, tokens, seq)
  base, (B, T, D) = pb.base, pb.x_BTD.shape
  log(f"preset {preset}: D={D} E={base.n_routed_experts} K={base.top_k} "
      f"n_group={base.n_group} topk_group={base.topk_group} F={base.moe_ffn_dim}, "
      f"{B * T} tokens ({B}x{T}), {dtype}, {len(jax.devices())} devices")
  overrides = settings(capacity_factor)
  single = {}
  for name, over in overrides.items():
    fwd, fwd_bwd = _layer(base.replace(**over), jnp.zeros((base.n_routed_experts,), jnp.float32))
    single[name] = (median_time(fwd, (pb.params, pb.x_BTD), repeats),
                    median_time(fwd_bwd, (pb.params, pb.x_BTD), repeats))
  rows = []
  for mesh_name in meshes:
    for name, over in overrides.items():
      rows.append(mesh_row(pb, mesh_name, name, over, single[name], repeats))
      log(format_row(rows[-1]))
  return rows
