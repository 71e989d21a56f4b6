"""A model's decode step compiled for a TPU slice on this host: what serving holds a chip.

One cached decode step (Transformer.extend of one token per request against a latent
cache of `context` positions a request) is lowered with abstract inputs and compiled by
the TPU compiler for the slice's abstract devices, as train/aot.py does for the train
step. Layout: the cache's requests split over the batch axes and "tensor" (attention
data parallelism: each chip holds whole requests, never a copy of another chip's), the
routed experts over "expert" (expert parallelism: the decode step's all-to-all), heads
over "tensor", the other weights by the training rules (their d_model dim split over
the batch axes too). Weights in the config's param dtype (bfloat16 for serving), or
int8 with per-output-channel scales (weights="int8", inference/quantize.py), dequantised
inside the step.

What comes back: per chip the weights, the cache and the compiler's temporaries
(memory_analysis), the cache's bytes a token read off the compiled program's cache
argument against the analytic L x (R + P) x itemsize (70,272 for V3 in bfloat16), and an
HBM roofline of the step (a decode step reads every weight shard and the whole cache
shard once: step >= those bytes / HBM bandwidth) with its output tokens/s a chip.

The MHA counterfactual (mha=True): the same step with the cache holding per-head K and V
(inference/mha_cache.py), compiled the same way. An MHA cache has heads, so it splits
them over "tensor" and its requests over the batch axes (no copy either way); its bytes
a token come from its own compiled program, so the MLA : MHA ratio is the compiler's.
With find_max_batch the largest batch that fits is found by compiling (max_batch.py).
"""

from __future__ import annotations

import math
import time

import flax.linen as nn
import jax
from absl import logging
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as PS

from deepseek_jax.inference import max_batch, mha_cache, quantize
from deepseek_jax.model import kv_cache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.partitioning import BATCH
from deepseek_jax.model.transformer import Transformer
from deepseek_jax.train import aot_memory, sharding, tpu

WEIGHTS = ("bf16", "int8")


def request_axes(mesh, cache: str = "mla") -> tuple | None:
  """The mesh axes a cache's requests split over: the batch axes, and "tensor" too for
  the latent (which has no heads to split there; replicated it would hold every token
  once a tensor shard). An MHA cache splits its heads over "tensor" instead."""
  axes = BATCH + (("tensor",) if cache == "mla" else ())
  return tuple(a for a in axes if mesh.shape[a] > 1) or None


def request_shards(mesh, cache: str = "mla") -> int:
  """How many ways the requests split: a batch is a multiple of it (whole requests)."""
  return math.prod(mesh.shape[a] for a in (request_axes(mesh, cache) or ()))


def _int8(boxed_params, shardings, mesh):
  """Abstract Int8Weight leaves (q with the weight's sharding, scales with its output
  axes' sharding) in place of every matmul weight."""
  def one(path, x, sh):
    value, names = x.value, tuple(x.names)
    axes = quantize.contraction_axes(str(path[-1].key), names, value.ndim)
    if axes is None:
      return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sh)
    scale_sh = NamedSharding(mesh, quantize.scale_spec(sh.spec, axes, value.ndim))
    return quantize.Int8Weight(
        q=jax.ShapeDtypeStruct(value.shape, jnp.int8, sharding=sh),
        scale=jax.ShapeDtypeStruct(quantize.scale_shape(value.shape, axes), jnp.float32,
                                   sharding=scale_sh))
  return jax.tree_util.tree_map_with_path(
      one, boxed_params, shardings, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(cfg: ModelConfig, mesh, weights: str = "bf16"):
  """(model, abstract params, abstract balancing bias or None) with their shardings."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights must be one of {WEIGHTS}; got {weights!r}")
  model = Transformer(cfg)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  shardings = sharding.param_shardings(boxed["params"], mesh)
  if weights == "int8":
    params = _int8(boxed["params"], shardings, mesh)
  else:
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(boxed)["params"], shardings)
  bias = None
  if "balance" in boxed:
    b = nn.unbox(boxed)["balance"]["expert_bias"]
    bias = jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=NamedSharding(mesh, PS()))
  return model, params, bias


def abstract_cache(cfg: ModelConfig, mesh, batch: int, context: int, cache: str = "mla"):
  """An abstract empty cache ("mla": kv_cache.KVCache; "mha": mha_cache.MHACache) of
  `batch` requests and `context` positions, split as request_axes says."""
  rows = request_axes(mesh, cache)
  sds = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                             sharding=NamedSharding(mesh, spec))
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, PS(rows)))
  if cache == "mla":
    c = jax.eval_shape(lambda: kv_cache.create(cfg, cfg.n_layers, batch, context))
    split = PS(None, rows, None, None)
    return c.replace(c_kv=sds(c.c_kv, split), k_rope=sds(c.k_rope, split), lengths=lengths)
  c = jax.eval_shape(lambda: mha_cache.create(cfg, cfg.n_layers, batch, context))
  heads = "tensor" if mesh.shape["tensor"] > 1 else None
  split = PS(None, rows, heads, None, None)
  return c.replace(k=sds(c.k, split), v=sds(c.v, split), lengths=lengths)


def cache_arrays(cache):
  return (cache.c_kv, cache.k_rope) if isinstance(cache, kv_cache.KVCache) else (cache.k,
                                                                                 cache.v)


def compile_program(fn, args, donate: tuple[int, ...], mesh, chip) -> dict:
  """Compile jit(fn) at abstract `args` for the mesh's devices: {"compiled", "fits_hbm",
  "compile_s", "temporaries", "total"}; on the compiler's out-of-memory, fits_hbm False,
  compiled None and its message as "error"."""
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  except Exception as e:  # the TPU compiler's out-of-memory is an XlaRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    msg = next((l for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l), str(e))
    return {"compiled": None, "fits_hbm": False, "compile_s": time.perf_counter() - t0,
            "error": msg[:1000]}
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
           + mem.output_size_in_bytes - mem.alias_size_in_bytes)
  return {"compiled": compiled, "fits_hbm": bool(total <= chip.hbm_bytes),
          "compile_s": time.perf_counter() - t0, "temporaries": mem.temp_size_in_bytes,
          "total": total}


def compiled_arg_bytes(compiled, argnum: int, arg, parts) -> int:
  """Bytes one chip holds of `parts` (arrays of argument `argnum`, `arg`) as the compiled
  program lays them out (its input shardings' shard shapes); the abstract shardings
  when nothing compiled."""
  if compiled is None:
    return aot_memory.per_chip_bytes(parts)
  shardings = compiled.input_shardings[0][argnum]
  by_id = dict(zip(map(id, jax.tree.leaves(arg)), jax.tree.leaves(shardings)))
  return sum(math.prod(by_id[id(x)].shard_shape(x.shape)) * x.dtype.itemsize
             for x in parts)


def decode_program(cfg: ModelConfig, mesh, chip, batch: int, context: int,
                   cache: str = "mla", weights: str = "bf16") -> dict:
  """One greedy decode step of `batch` requests at `context` cached positions, compiled:
  per-chip bytes, fits_hbm, the cache's bytes a token and the HBM roofline."""
  model, params, bias = abstract_params(cfg, mesh, weights)
  c = abstract_cache(cfg, mesh, batch, context, cache)
  shards = request_shards(mesh, cache)
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=NamedSharding(
      mesh, PS(request_axes(mesh, cache), None)))
  method = Transformer.extend if cache == "mla" else mha_cache.extend

  def step(params, bias, tokens, c):
    if weights == "int8":
      params = quantize.dequantize_params(params, cfg.jnp_dtype)
    variables = {"params": params}
    if bias is not None:
      variables["balance"] = {"expert_bias": bias}
    out, c = model.apply(variables, tokens, c, method=method)
    return jnp.argmax(out.logits[:, 0], axis=-1), c

  out = {"cache": cache, "weights": weights, "batch": batch, "context": context,
         "request_shards": shards}
  if batch % shards:
    return {**out, "fits_hbm": False, "compile_s": 0.0,
            "error": f"batch {batch} is not a multiple of the {shards} request shards"}
  res = compile_program(step, (params, bias, tokens, c), (3,), mesh, chip)
  compiled = res.pop("compiled")
  n_chips = mesh.devices.size
  # The weights as given (the MTP modules' included, though this step prunes them),
  # the cache as the compiled program lays out its cache argument.
  weights_b = aot_memory.per_chip_bytes(params)
  cache_b = compiled_arg_bytes(compiled, 3, c, cache_arrays(c))
  out.update(cache_bytes_per_token=cache_b * n_chips / (batch * context),
             cache_bytes_from=("the compiled program's cache argument" if compiled else
                               "the cache argument as given (nothing compiled)"),
             fits_hbm=res["fits_hbm"], compile_s=res["compile_s"])
  if compiled is None:
    out.update(per_chip_bytes={"weights": weights_b, "cache": cache_b},
               error=res["error"])
    return out
  step_s = (weights_b + cache_b) / chip.hbm_bw
  out.update(
      per_chip_bytes={"weights": weights_b, "cache": cache_b,
                      "temporaries": res["temporaries"], "total": res["total"]},
      roofline={"step_s": step_s, "tokens_per_s_per_chip": batch / step_s / n_chips,
                "note": "HBM bound: every weight shard and cache shard read once a step"})
  return out


def _search(cfg, mesh, chip, guess: int, context: int, cache: str, weights: str):
  """max_batch.search over decode_program: (largest batch that fits or 0, its report or
  None, the trail [[batch, fits, per-chip total bytes or None, compile_s], ...])."""
  reports = {}

  def fits(b):
    reports[b] = r = decode_program(cfg, mesh, chip, b, context, cache, weights)
    logging.info("max batch search (%s cache, %s weights, context %d): batch %d %s "
                 "(compile %.0f s) %s", cache, weights, context, b,
                 "fits" if r["fits_hbm"] else "does not fit", r["compile_s"],
                 r.get("error", ""))
    return r["fits_hbm"]

  n, trail = max_batch.search(fits, guess, request_shards(mesh, cache))
  trail = [[b, ok, reports[b].get("per_chip_bytes", {}).get("total"),
            round(reports[b]["compile_s"], 1)] for b, ok in trail]
  return n, reports.get(n), trail


def decode_report(cfg: ModelConfig, topology: str, batch: int, context: int,
                  mesh_cfg: dict, weights: str = "bf16", mha: bool = False,
                  find_max_batch: bool = False) -> dict:
  """The report the module docstring describes for cfg (layers unrolled) on `topology`.
  find_max_batch: `batch` is the first guess and the report is at the largest batch
  that fits ("max_batch" = {context: n}); mha: the MHA program at that batch beside it
  (and, with find_max_batch, the MHA's own largest batch)."""
  cfg = cfg.replace(scan_layers=False)
  kind, _ = tpu.parse_topology(topology)
  chip = tpu.CHIPS[kind]
  mesh = sharding.make_mesh(mesh_cfg, tpu.topology_devices(topology), cfg.d_model)
  head = {"mode": "decode", "topology": topology, "n_chips": mesh.devices.size,
          "mesh": dict(mesh.shape), "n_layers": cfg.n_layers,
          "hbm_bytes_per_chip": chip.hbm_bytes,
          "analytic_cache_bytes_per_token": cfg.n_layers * (
              cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(cfg.dtype).itemsize}
  if find_max_batch:
    n, r, trail = _search(cfg, mesh, chip, batch, context, "mla", weights)
    if r is None:   # not even one request a shard: report the smallest batch's failure
      r = decode_program(cfg, mesh, chip, request_shards(mesh), context, "mla", weights)
    out = {**head, **r, "max_batch": {str(context): n}, "search": trail}
  else:
    out = {**head, **decode_program(cfg, mesh, chip, batch, context, "mla", weights)}
  if mha:
    m = decode_program(cfg, mesh, chip, out["batch"], context, "mha", weights)
    if find_max_batch:
      n, best, trail = _search(cfg, mesh, chip, request_shards(mesh, "mha"), context, "mha",
                               weights)
      m.update(max_batch={str(context): n}, search=trail)
      if best is not None:   # bytes a token off a program that compiled
        m["cache_bytes_per_token"] = best["cache_bytes_per_token"]
        m["cache_bytes_from"] = f"{best['cache_bytes_from']} at batch {n}"
        m["at_max_batch"] = best
    out["mha"] = m
    out["mha_cache_bytes_per_token"] = m["cache_bytes_per_token"]
    out["mha_over_mla_cache_bytes"] = m["cache_bytes_per_token"] / out["cache_bytes_per_token"]
  return out


def _program_lines(r: dict, label: str) -> list[str]:
  lines = [f"{label}: {r['batch']} requests x {r['context']} positions, weights "
           f"{r['weights']}, cache split {r['request_shards']} ways by request | compile_s "
           f"{r['compile_s']:.1f}",
           f"  cache bytes a token the slice stores (all layers, from "
           f"{r['cache_bytes_from']}): {r['cache_bytes_per_token']:,.0f}"]
  lines += aot_memory.per_chip_lines(r.get("per_chip_bytes", {}))
  lines.append(f"  fits_hbm: {'true' if r['fits_hbm'] else 'false'}")
  if not r["fits_hbm"]:
    lines.append(f"  compiler: {r.get('error', '')[:400]}")
  else:
    rf = r["roofline"]
    lines.append(f"  ROOFLINE (a bound, not measured): decode step >= "
                 f"{rf['step_s'] * 1e3:.2f} ms, {rf['tokens_per_s_per_chip']:,.1f} output "
                 f"tokens/s a chip")
  if "max_batch" in r:
    lines.append(f"  largest batch that fits (by compiling): {r['max_batch']} | tried "
                 f"{r['search']}")
  return lines


def format_decode_report(r: dict) -> str:
  mesh = aot_memory.mesh_text(r["mesh"])
  lines = [f"decode on {r['topology']} ({r['n_chips']} chips) | mesh {mesh} | "
           f"{r['n_layers']} layers | HBM per chip "
           f"{aot_memory.gib(r['hbm_bytes_per_chip'])}",
           f"  analytic latent cache bytes a token (one copy): "
           f"{r['analytic_cache_bytes_per_token']:,}"]
  lines += _program_lines(r, "MLA (latent cache)")
  if "mha" in r:
    lines += _program_lines(r["mha"], "MHA counterfactual (per-head K and V cached)")
    lines.append(f"  MHA / MLA cache bytes a token (both compiled): "
                 f"{r['mha_over_mla_cache_bytes']:.1f}x")
  return "\n".join(lines)
