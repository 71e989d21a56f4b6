"""A model's prefill compiled for a TPU slice on this host (inference/prefill.py): `batch`
prompts of `context` tokens run into an empty latent cache of `context` positions, laid
out as the decode step's (compile_decode.py: requests split over the batch axes and
"tensor", experts over "expert"), weights bf16 or int8.

What comes back: per chip the weights, the cache, the compiler's temporaries and the
total (memory_analysis), fits_hbm, compile_s, and a compute roofline. Prefill is compute
bound: step >= max(FLOPs / (chips x peak), (weights + cache) / (chips x HBM bandwidth)),
with the FLOPs the model's analytic forward count (train/metrics.py: 2 x the activated
matmul weights a token, plus causal QK^T and PV over context / 2 keys on average, less
the output head at every token but the last). XLA's cost_analysis FLOPs are kept for
reference: they count each loop body once (blockwise attention is a loop), so they
undercount.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as PS

from deepseek_jax.inference import compile_decode as cd
from deepseek_jax.inference import prefill, quantize
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import aot_memory, sharding, tpu
from deepseek_jax.train.metrics import train_flops_per_token


def prefill_flops_per_token(cfg: ModelConfig, context: int) -> float:
  """Forward FLOPs a prompt token: the train count / 3 without MTP, less the head at
  all but the last token."""
  fwd = train_flops_per_token(cfg.replace(mtp_depth=0), context) / 3.0
  return fwd - 2.0 * cfg.d_model * cfg.vocab_size * (1 - 1 / context)


def _xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def prefill_report(cfg: ModelConfig, topology: str, batch: int, context: int,
                   mesh_cfg: dict, weights: str = "bf16") -> dict:
  """Compile one prefill of cfg (layers unrolled) for `topology`; the report the
  module docstring describes, fits_hbm False with the compiler's message when it does
  not fit."""
  cfg = cfg.replace(scan_layers=False, mtp_depth=0)
  kind, _ = tpu.parse_topology(topology)
  chip = tpu.CHIPS[kind]
  mesh = sharding.make_mesh(mesh_cfg, tpu.topology_devices(topology), cfg.d_model)
  n_chips, shards = mesh.devices.size, cd.request_shards(mesh)
  model, params, bias = cd.abstract_params(cfg, mesh, weights)
  cache = cd.abstract_cache(cfg, mesh, batch, context)
  tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=NamedSharding(
      mesh, PS(cd.request_axes(mesh), None)))
  out = {"mode": "prefill", "topology": topology, "n_chips": n_chips,
         "mesh": dict(mesh.shape), "n_layers": cfg.n_layers, "batch": batch,
         "context": context, "weights": weights, "request_shards": shards,
         "hbm_bytes_per_chip": chip.hbm_bytes, "attention_impl": cfg.attention_impl}
  if batch % shards:
    raise ValueError(f"--batch {batch} must be a multiple of the {shards} request shards "
                     f"(every chip holds whole requests)")

  def step(params, bias, tokens, cache):
    if weights == "int8":
      params = quantize.dequantize_params(params, cfg.jnp_dtype)
    variables = {"params": params}
    if bias is not None:
      variables["balance"] = {"expert_bias": bias}
    o, cache = model.apply(variables, tokens, cache, method=prefill.prefill)
    return jnp.argmax(o.logits[:, 0], axis=-1), cache

  res = cd.compile_program(step, (params, bias, tokens, cache), (3,), mesh, chip)
  compiled = res.pop("compiled")
  weights_b = aot_memory.per_chip_bytes(params)
  cache_b = cd.compiled_arg_bytes(compiled, 3, cache, cd.cache_arrays(cache))
  out.update(fits_hbm=res["fits_hbm"], compile_s=res["compile_s"])
  if compiled is None:
    out.update(per_chip_bytes={"weights": weights_b, "cache": cache_b}, error=res["error"])
    return out
  flops = prefill_flops_per_token(cfg, context) * batch * context
  compute_s = flops / (n_chips * chip.peak_flops)
  hbm_s = (weights_b + cache_b) / chip.hbm_bw
  step_s = max(compute_s, hbm_s)
  out.update(
      per_chip_bytes={"weights": weights_b, "cache": cache_b,
                      "temporaries": res["temporaries"], "total": res["total"]},
      flops={"analytic_total": flops, "analytic_per_chip": flops / n_chips,
             "xla_cost_analysis_per_chip": _xla_flops(compiled)},
      roofline={"step_s": step_s, "compute_s": compute_s, "hbm_s": hbm_s,
                "tokens_per_s_per_chip": batch * context / step_s / n_chips,
                "note": "a bound: analytic forward FLOPs at the chip's bf16 peak (or "
                        "one read of the weights and cache shards, if longer)"})
  return out


def format_prefill_report(r: dict) -> str:
  mesh = aot_memory.mesh_text(r["mesh"])
  lines = [f"prefill on {r['topology']} ({r['n_chips']} chips) | mesh {mesh} | "
           f"{r['batch']} prompts x {r['context']} tokens | {r['n_layers']} layers | "
           f"weights {r['weights']} | attention {r['attention_impl']}",
           f"compile_s: {r['compile_s']:.1f}"]
  lines += aot_memory.per_chip_lines(r.get("per_chip_bytes", {}))
  lines.append(f"  HBM per chip          {aot_memory.gib(r['hbm_bytes_per_chip'])}")
  lines.append(f"fits_hbm: {'true' if r['fits_hbm'] else 'false'}")
  if not r["fits_hbm"]:
    lines.append(f"  compiler: {r.get('error', '')[:400]}")
    return "\n".join(lines)
  rf = r["roofline"]
  lines.append(f"ROOFLINE (a bound, not measured): prefill >= {rf['step_s']:.2f} s "
               f"(compute {rf['compute_s']:.2f} s, HBM {rf['hbm_s']:.3f} s), "
               f"{rf['tokens_per_s_per_chip']:,.0f} prompt tokens/s a chip")
  return "\n".join(lines)
