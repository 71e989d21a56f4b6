"""Benchmark (not a test) of the expert-parallel MoE layer on simulated CPU devices.

  python -m experiments.bench_expert_parallel
  python -m experiments.bench_expert_parallel --meshes=2x4 --tokens=4096 --dtype=bfloat16

For each data x expert mesh and each buffer setting (dropless, C = tokens; rounds:
C = ceil(f X fanout / S) and the overflow sent in further rounds; capacity: the same C,
overflow dropped) it reports:
  - bytes the dispatch all-to-all moves off each shard per token, counted from the
    exchanged buffers (occupied rows), against the analytic K * D * itemsize * (S-1)/S
    (one row per routed assignment, uniform routing) and against the exact expectation
    of this dispatch (one row per distinct off-shard destination of a token);
  - wire bytes per token: every padded buffer row leaving a shard, dispatch and combine
    plus the expert ids and gates that travel with the rows;
  - time per MoE layer (forward, and forward + backward) on the mesh against the same
    layer on one device. The simulated devices share the host's cores, so the ratio
    shows the dispatch overhead, not a speed-up.
"""

import json
import time

from absl import app, flags

from experiments import launch

_MESHES = flags.DEFINE_list("meshes", ["1x8", "2x4", "4x2"], "data x expert meshes.")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens per MoE layer call (all shards).")
_SEQ = flags.DEFINE_integer("seq", 64, "Sequence length (tokens = batch * seq).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 1.25, "The capacity setting's factor.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls (median reported).")
_PRESET = flags.DEFINE_string("preset", "small", "Model preset (config.PRESETS).")
_OUT = flags.DEFINE_string("out", None, "Also write the results as JSON here.")
flags.FLAGS.set_default("cpu_devices", 8)


def _median_time(fn, args, repeats):
  import jax
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def main(argv):
  del argv
  launch.init_distributed()
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import numpy as np
  from deepseek_jax.model import config, expert_parallel, moe
  from deepseek_jax.train import sharding

  base = config.preset(_PRESET.value, dtype=_DTYPE.value)
  D, K, E = base.d_model, base.top_k, base.n_routed_experts
  itemsize = jnp.dtype(_DTYPE.value).itemsize
  B, T = _TOKENS.value // _SEQ.value, _SEQ.value
  X = B * T
  rng = np.random.default_rng(0)
  x_BTD = jnp.asarray(rng.standard_normal((B, T, D)), base.jnp_dtype)
  bias_E = jnp.zeros((E,), jnp.float32)
  params = nn.unbox(moe.MoE(base).init(jax.random.PRNGKey(0), x_BTD, bias_E))["params"]
  print(f"preset {_PRESET.value}: D={D} E={E} K={K} n_group={base.n_group} "
        f"topk_group={base.topk_group} F={base.moe_ffn_dim}, {X} tokens "
        f"({B}x{T}), {_DTYPE.value}, {len(jax.devices())} devices")

  def layer(cfg):
    def fwd(p, x):
      return moe.MoE(cfg).apply({"params": p}, x, bias_E)[0]
    def fwd_bwd(p, x):
      return jax.grad(lambda p, x: jnp.sum(fwd(p, x).astype(jnp.float32) ** 2),
                      argnums=(0, 1))(p, x)
    return jax.jit(fwd), jax.jit(fwd_bwd)

  # Routing is the same everywhere (it never depends on the mesh).
  scores_XE = moe.affinities(x_BTD.reshape(X, D).astype(jnp.float32) @ params["w_router"],
                             base)
  idx_XK, gates_XK = moe.route(scores_XE, bias_E, base)
  idx = np.asarray(idx_XK)

  settings = {"dropless": dict(moe_dispatch="dropless"),
              "rounds": dict(moe_dispatch="dropless", ep_capacity_factor=_CAPACITY.value),
              "capacity": dict(moe_dispatch="capacity", capacity_factor=_CAPACITY.value)}
  single = {}
  for name, over in settings.items():
    fwd, fwd_bwd = layer(base.replace(**over))
    single[name] = (_median_time(fwd, (params, x_BTD), _REPEATS.value),
                    _median_time(fwd_bwd, (params, x_BTD), _REPEATS.value))
  results = []
  for mesh_name in _MESHES.value:
    data, S = (int(v) for v in mesh_name.split("x"))
    mesh = sharding.make_mesh(dict(data=data, fsdp=1, expert=S, tensor=1))
    # Token n of the batch lives on batch shard n // (X / 8); its expert-axis index is
    # that shard's index mod S (batch shards run over data, fsdp, expert).
    src_X = (np.arange(X) // (X // (data * S))) % S
    dest_XK = idx // (E // S)
    off_shard_assign = (dest_XK != src_X[:, None]).mean()
    distinct_off = np.mean([len(set(d) - {s}) for d, s in zip(dest_XK, src_X)])
    for name, over in settings.items():
      cfg = base.replace(**over)
      with jax.set_mesh(mesh):
        traffic_fn = jax.jit(lambda x, i, g, wg, wu, wd: expert_parallel.routed_experts(
            x, i, g, wg, wu, wd, cfg, jax.sharding.get_abstract_mesh(), traffic=True))
        _, _, dropped, traffic = traffic_fn(
            x_BTD, idx_XK.reshape(B, T, K), gates_XK.reshape(B, T, K),
            *(params[w].astype(base.jnp_dtype) for w in ("w_gate", "w_up", "w_down")))
        fwd, fwd_bwd = layer(cfg)
        t_fwd = _median_time(fwd, (params, x_BTD), _REPEATS.value)
        t_fwd_bwd = _median_time(fwd_bwd, (params, x_BTD), _REPEATS.value)
      r = {
          "mesh": mesh_name, "setting": name,
          "capacity_rows": expert_parallel.shard_capacity(X // (data * S), cfg, S),
          "dropped_frac": float(dropped) / (K * X),
          "payload_bytes_per_token": float(traffic["payload_rows"]) * D * itemsize / X,
          "analytic_bytes_per_token": K * D * itemsize * (S - 1) / S,
          "analytic_measured_fraction": K * D * itemsize * off_shard_assign,
          "expected_dedup_bytes_per_token": D * itemsize * distinct_off,
          "wire_bytes_per_token": float(traffic["wire_bytes"]) / X,
          "rounds": int(traffic["rounds"]),
          "ms_fwd": 1e3 * t_fwd, "ms_fwd_single": 1e3 * single[name][0],
          "ms_fwd_bwd": 1e3 * t_fwd_bwd, "ms_fwd_bwd_single": 1e3 * single[name][1],
      }
      results.append(r)
      print(f"{mesh_name} {name:8s} C={r['capacity_rows']:4d} x {r['rounds']} round(s), "
            f"dropped {100 * r['dropped_frac']:.2f}% | dispatch bytes/token: measured "
            f"{r['payload_bytes_per_token']:.0f}, analytic K*D*b*(S-1)/S "
            f"{r['analytic_bytes_per_token']:.0f} (at the measured off-shard fraction "
            f"{r['analytic_measured_fraction']:.0f}), expected with one row per "
            f"destination {r['expected_dedup_bytes_per_token']:.0f}; wire (padded, both "
            f"ways) {r['wire_bytes_per_token']:.0f} | ms fwd {r['ms_fwd']:.1f} vs "
            f"{r['ms_fwd_single']:.1f} one device, fwd+bwd {r['ms_fwd_bwd']:.1f} vs "
            f"{r['ms_fwd_bwd_single']:.1f}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
