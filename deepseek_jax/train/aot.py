"""Ahead-of-time compilation of the train step for a TPU topology, on any host.

The slice's abstract devices (train/tpu.py) take the config's mesh (one axis may be -1),
and the train step that experiments.train runs (program.build: same function, shardings,
donation, microbatches) is lowered with ShapeDtypeStructs and compiled by the TPU
compiler. What comes back is the compiler's word, not an estimate: the per-chip memory
(train/aot_memory.py) and, from the compiled HLO, the executed work, HBM and collective
bytes and a roofline step (train/aot_work.py), at balanced routing or at a run's
routing (train/aot_routing.py). XLA's own cost analysis (each loop body once, kernels at
their static estimate) is kept for reference. train/aot_text.py prints the report.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from deepseek_jax.model.config import model_config_from
from deepseek_jax.train import program as program_lib, sharding
from deepseek_jax.train.aot_memory import bytes_from_oom, memory_breakdown
from deepseek_jax.train.aot_routing import routed_rows_per_buffer, routing_rounds
from deepseek_jax.train.aot_work import context_report, work_report
from deepseek_jax.train.metrics import train_flops_per_token
from deepseek_jax.train.tpu import CHIPS, parse_topology, topology_devices


def abstract_inputs(program):
  """ShapeDtypeStructs (with shardings) of the program's train step's three arguments."""
  cfg = program.cfg
  row = (cfg.batch_size, cfg.seq_len + 1)
  batch = {k: jax.ShapeDtypeStruct(row, jnp.int32, sharding=program.batch_sh)
           for k in ("tokens", "segments", "positions")}
  from deepseek_jax.train.step import balance_hparams
  rep = NamedSharding(program.mesh, jax.sharding.PartitionSpec())
  hparams = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
             for k in balance_hparams(cfg)}
  return program.abstract_state(), batch, hparams


def compile_train_step(cfg, mesh):
  """(compiled, abstract train state, compile seconds) of cfg's train step on `mesh`
  (cfg's microbatches resolved for it); raises the compiler's RESOURCE_EXHAUSTED as is."""
  program_lib.validate_run_config(cfg, mesh)
  program = program_lib.build(cfg, model_config_from(cfg.model), mesh)
  args = abstract_inputs(program)
  t0 = time.perf_counter()
  compiled = program.compile_train_step(*args)
  return compiled, args[0], time.perf_counter() - t0


def report(cfg, topology: str, routing_counts=None, dump_hlo: str | None = None) -> dict:
  """Compile cfg's train step for `topology` and measure it (see the module docstring).
  A program that does not fit comes back with fits_hbm False and the compiler's message.
  routing_counts: per-layer expert counts [L, E] to count the routed work at (None:
  balanced routing); dump_hlo: a file to write the optimised HLO text to."""
  kind, _ = parse_topology(topology)
  chip = CHIPS[kind]
  devices = topology_devices(topology)
  model_cfg = model_config_from(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh, devices, model_cfg.d_model)
  cfg = program_lib.resolve_microbatches(cfg, mesh)
  model_flops = train_flops_per_token(model_cfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len
  out = {"topology": topology, "n_chips": len(devices), "mesh": dict(mesh.shape),
         "batch": [cfg.batch_size, cfg.seq_len], "microbatches": int(cfg.microbatches),
         "n_layers": model_cfg.n_layers, "hbm_bytes_per_chip": chip.hbm_bytes,
         "model_flops_per_step": model_flops, "chip_source": chip.source}
  t0 = time.perf_counter()
  try:
    compiled, state, compile_s = compile_train_step(cfg, mesh)
  except Exception as e:  # the TPU compiler's out-of-memory is an XlaRuntimeError
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg:
      raise
    oom = next((line for line in msg.splitlines() if "RESOURCE_EXHAUSTED" in line), msg)
    out.update(fits_hbm=False, compile_s=time.perf_counter() - t0, error=oom[:2000],
               per_chip_bytes=bytes_from_oom(msg))
    return out
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):
    cost = cost[0]
  hlo_text = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as fh:
      fh.write(hlo_text)
  out.update(memory_breakdown(compiled, state, mesh, chip.hbm_bytes))
  out.update(compile_s=compile_s,
             xla_cost_analysis={"flops": float(cost.get("flops", 0.0)),
                                "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                                "note": "XLA's own count: each loop body once, kernels "
                                        "at their static estimate; for reference only"})
  live = routed_rows_per_buffer(cfg, model_cfg, mesh)
  routing = None
  if routing_counts is not None:
    routing = routing_rounds(routing_counts, cfg, model_cfg, mesh)
    out["routing"] = routing
    out["balanced"] = {k: v for k, v in work_report(
        hlo_text, cfg, model_cfg, chip, len(devices), live).items()
        if k in ("executed_flops_per_chip", "flops_by_class", "roofline")}
  out.update(work_report(hlo_text, cfg, model_cfg, chip, len(devices), live, routing))
  ctx = context_report(hlo_text, cfg, model_cfg, mesh)
  if ctx is not None:
    out["context"] = ctx
  return out
