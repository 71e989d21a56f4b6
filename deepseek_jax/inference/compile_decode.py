"""A model's decode step compiled for a TPU slice on this host: what serving holds a chip.

One cached decode step (Transformer.extend of one token per request against a latent
cache of `context` positions a request) is lowered with abstract inputs and compiled by
the TPU compiler for the slice's abstract devices, as train/aot.py does for the train
step. Layout: the cache's requests split over the batch axes and "tensor" (attention
data parallelism: each chip holds whole requests, never a copy of another chip's), the
routed experts over "expert" (expert parallelism: the decode step's all-to-all), heads
over "tensor", the other weights by the training rules (their d_model dim split over
the batch axes too). Weights in the config's param dtype (bfloat16 for serving).

What comes back: per chip the weights, the cache and the compiler's temporaries
(memory_analysis), the cache's bytes a token read off the program's cache argument
against the analytic L x (R + P) x itemsize (70,272 for V3 in bfloat16), and an HBM
roofline of the step (a decode step reads every weight shard and the whole cache
shard once: step >= those bytes / HBM bandwidth) with its output tokens/s a chip.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as PS

from deepseek_jax.model import kv_cache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.partitioning import BATCH
from deepseek_jax.model.transformer import Transformer
from deepseek_jax.train import aot, sharding


def decode_inputs(cfg: ModelConfig, mesh, batch: int, context: int):
  """Abstract (params, bias, tokens [B, 1], cache) with their shardings."""
  model = Transformer(cfg)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  shardings = sharding.param_shardings(boxed["params"], mesh)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        nn.unbox(boxed)["params"], shardings)
  rep = NamedSharding(mesh, PS())
  bias = None
  if "balance" in boxed:
    b = nn.unbox(boxed)["balance"]["expert_bias"]
    bias = jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=rep)
  # Requests split over "tensor" too: a cache replicated over it would hold every
  # token twice (at tensor 2) for heads it does not own (MLA's latent has no heads).
  rows = tuple(a for a in BATCH + ("tensor",) if mesh.shape[a] > 1) or None
  cache = jax.eval_shape(lambda: kv_cache.create(cfg, cfg.n_layers, batch, context))
  split = NamedSharding(mesh, PS(None, rows, None, None))
  cache = cache.replace(
      c_kv=jax.ShapeDtypeStruct(cache.c_kv.shape, cache.c_kv.dtype, sharding=split),
      k_rope=jax.ShapeDtypeStruct(cache.k_rope.shape, cache.k_rope.dtype, sharding=split),
      lengths=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, PS(rows))))
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32,
                                sharding=NamedSharding(mesh, PS(rows, None)))
  return model, params, bias, tokens, cache


def decode_report(cfg: ModelConfig, topology: str, batch: int, context: int,
                  mesh_cfg: dict) -> dict:
  """Compile one greedy decode step of cfg (unrolled layers) for `topology` with
  `batch` requests of `context` cached positions; the report the module docstring
  describes, fits_hbm False with the compiler's message when it does not fit."""
  cfg = cfg.replace(scan_layers=False)
  kind, _ = aot.parse_topology(topology)
  chip = aot.CHIPS[kind]
  devices = aot.topology_devices(topology)
  mesh = sharding.make_mesh(mesh_cfg, devices, cfg.d_model)
  model, params, bias, tokens, cache = decode_inputs(cfg, mesh, batch, context)

  def step(params, bias, tokens, cache):
    variables = {"params": params}
    if bias is not None:
      variables["balance"] = {"expert_bias": bias}
    out, cache = model.apply(variables, tokens, cache, method=Transformer.extend)
    return jnp.argmax(out.logits[:, 0], axis=-1), cache

  analytic = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(
      cfg.dtype).itemsize
  weights = aot.per_chip_bytes(params)
  cache_chip = aot.per_chip_bytes((cache.c_kv, cache.k_rope))
  out = {"mode": "decode", "topology": topology, "n_chips": len(devices),
         "mesh": dict(mesh.shape), "batch": batch, "context": context,
         "n_layers": cfg.n_layers, "hbm_bytes_per_chip": chip.hbm_bytes,
         # What the slice stores a token, copies included (the cache is replicated
         # over the axes that do not split its requests, e.g. "tensor").
         "cache_bytes_per_token": cache_chip * len(devices) / (batch * context),
         "analytic_cache_bytes_per_token": analytic}
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = jax.jit(step, donate_argnums=(3,)).lower(params, bias, tokens,
                                                          cache).compile()
  except Exception as e:  # the TPU compiler's out-of-memory is an XlaRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    msg = next((l for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l), str(e))
    out.update(fits_hbm=False, compile_s=time.perf_counter() - t0, error=msg[:1000])
    return out
  mem = compiled.memory_analysis()
  temps = mem.temp_size_in_bytes
  total = (mem.argument_size_in_bytes + temps + mem.output_size_in_bytes
           - mem.alias_size_in_bytes)
  step_s = (weights + cache_chip) / chip.hbm_bw
  out.update(
      per_chip_bytes={"weights": weights, "cache": cache_chip, "temporaries": temps,
                      "total": total},
      fits_hbm=bool(total <= chip.hbm_bytes), compile_s=time.perf_counter() - t0,
      roofline={"step_s": step_s,
                "tokens_per_s_per_chip": batch / step_s / len(devices),
                "note": "HBM bound: every weight shard and cache shard read once a step"})
  return out


def format_decode_report(r: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"decode on {r['topology']} ({r['n_chips']} chips) | mesh {mesh} | "
           f"{r['batch']} requests x {r['context']} positions | {r['n_layers']} layers",
           f"compile_s: {r['compile_s']:.1f}",
           f"  cache bytes a token the slice stores (all layers, copies included): "
           f"{r['cache_bytes_per_token']:,.0f} (one copy: "
           f"{r['analytic_cache_bytes_per_token']:,})"]
  for k, v in r.get("per_chip_bytes", {}).items():
    lines.append(f"  per-chip {k:<12}{aot.gib(v)}")
  lines.append(f"  HBM per chip          {aot.gib(r['hbm_bytes_per_chip'])}")
  lines.append(f"fits_hbm: {'true' if r['fits_hbm'] else 'false'}")
  if not r["fits_hbm"]:
    lines.append(f"  compiler: {r.get('error', '')[:400]}")
    return "\n".join(lines)
  rf = r["roofline"]
  lines.append(f"ROOFLINE (a bound, not measured): decode step >= {rf['step_s'] * 1e3:.2f} ms, "
               f"{rf['tokens_per_s_per_chip']:,.1f} output tokens/s a chip")
  return "\n".join(lines)
