"""Ahead-of-time compilation of the train step for a TPU topology, on any host.

libtpu (the `tpu` extra) describes a TPU slice without one: `get_topology_desc` gives its
abstract devices, a Mesh over them takes the config's mesh (one axis may be -1), and
the train step that experiments.train runs (loop.build_steps: same function, shardings,
donation, microbatches) is lowered with ShapeDtypeStructs and compiled by the TPU
compiler. What comes back is the compiler's word, not an estimate:

  per-chip memory   arguments, temporaries, outputs (memory_analysis); total = what
                    must be resident = arguments + temporaries + outputs not aliased to
                    (donated) arguments; compared with the chip's HBM
  collectives       bytes per chip per step of every all-gather, all-reduce,
                    reduce-scatter, all-to-all and collective-permute in the compiled
                    HLO, each multiplied by the trip counts of the loops around it
  cost analysis     XLA's flops and bytes accessed; XLA counts a loop body ONCE (scanned
                    layers, microbatches), so these are per-iteration lower bounds

The step time and MFU are a roofline ESTIMATE from a table of public chip constants:
compute = analytic model FLOPs (x 4/3 when blocks recompute everything) / peak, ICI =
collective bytes / ICI bandwidth, step = the larger (perfect overlap at peak, no HBM
term): a lower bound on the step and an upper bound on MFU. Its use is the ratio of
the two terms: how far a layout is from being communication-bound.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from deepseek_jax.model.config import model_config_from
from deepseek_jax.train import loop, sharding
from deepseek_jax.train.metrics import train_flops_per_token

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float      # bf16 FLOP/s
  hbm_bytes: float
  ici_bw: float          # bytes/s per chip, bidirectional
  source: str


# Public per-chip numbers (Cloud TPU system architecture pages, read 2026-12).
CHIPS = {
    # HBM: the 95.74 GiB the TPU compiler reports available (the page says 95 GiB).
    "v5p": Chip(459e12, 95.74 * GIB, 1200e9,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at "
                "2765 GB/s (95.74 GiB available per the TPU compiler), 1200 GB/s "
                "bidirectional ICI per chip"),
    "v6e": Chip(918e12, 32e9, 800e9,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, "
                "800 GB/s bidirectional ICI per chip"),
    "v5e": Chip(197e12, 16e9, 400e9,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, "
                "400 GB/s bidirectional ICI per chip"),
    "v4": Chip(275e12, 32 * GIB, 1.1e15 / 4096,
               "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; "
               "ICI per chip taken as the pod's 1.1 PB/s all-reduce bandwidth / 4096 chips"),
}
_DIMS = {"v5p": 3, "v4": 3, "v6e": 2, "v5e": 2}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")


class TopologyError(ValueError):
  pass


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """"v5p:8x16x16" -> ("v5p", (8, 16, 16)), with a clear error for anything else."""
  m = re.fullmatch(r"(v5p|v6e|v5e|v4):(\d+(?:x\d+)*)", name.strip())
  if not m:
    raise TopologyError(
        f"unknown topology {name!r}: expected v5p:AxBxC, v4:AxBxC, v6e:AxB or v5e:AxB "
        f"(e.g. v5p:8x16x16 for 2048 chips, v5p:2x2x1 for one host)")
  kind, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if len(dims) != _DIMS[kind] or min(dims) < 1:
    raise TopologyError(f"topology {name!r}: {kind} takes {_DIMS[kind]} positive dims")
  return kind, dims


def topology_devices(name: str):
  """The abstract devices of a TPU slice (needs libtpu: pip install -e '.[tpu]')."""
  kind, dims = parse_topology(name)
  # Describing a topology holds no TPU: let several processes (tests, parallel compiles)
  # load libtpu at once instead of failing on its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # libtpu missing or refusing the shape
    raise TopologyError(
        f"could not describe TPU topology {name!r} ({type(e).__name__}: {e}). "
        "TPU compilation needs libtpu: pip install -e '.[tpu]'") from e
  devices = list(topo.devices)
  if len(devices) != math.prod(dims):
    raise TopologyError(f"topology {name!r} gave {len(devices)} devices, "
                        f"expected {math.prod(dims)}")
  return devices


# HLO reading -----------------------------------------------------------------------

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
             "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)"
                      r"|branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COND = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONST = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")


def _trip_from_condition(lines) -> int:
  """A scan's loop condition is `i < N` with one integer constant N (the TPU compiler
  does not annotate known_trip_count); 1 when the condition is anything else."""
  consts = {int(c) for line in lines for c in _INT_CONST.findall(line)}
  is_lt = any("direction=LT" in line for line in lines)
  return consts.pop() if is_lt and len(consts) == 1 else 1


def _array_bytes(shape_text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _ITEMSIZE:
      out.append(math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[dtype])
  return out


def _computations(hlo: str):
  """{name: [lines]} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(1)
        comps[current] = []
        if line.lstrip().startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
    else:
      comps[current].append(line)
  return comps, entry


@dataclasses.dataclass(frozen=True)
class Hlo:
  """Compiled HLO text read once: its computations ({name: lines}), how many times each
  runs per step (mult: the product of the trip counts of the while loops around it, 1
  for the entry) and the trip counts seen."""
  comps: dict
  mult: dict
  trips: list


def read_hlo(hlo: str) -> Hlo:
  comps, entry = _computations(hlo)
  edges = {name: [] for name in comps}
  trips = []
  for name, lines in comps.items():
    for line in lines:
      trip = 1
      if " while(" in line:
        m = _TRIP.search(line)
        cond = _COND.search(line)
        trip = (int(m.group(1)) if m else
                _trip_from_condition(comps.get(cond.group(1), [])) if cond else 1)
        trips.append(trip)
      for one, many in _CALLEES.findall(line):
        for callee in (one or many).split(","):
          callee = callee.strip().lstrip("%")
          if callee in comps:
            edges[name].append((callee, trip))
  mult = {}

  def visit(name, factor):
    if mult.get(name, 0) >= factor:
      return
    mult[name] = factor
    for callee, trip in edges[name]:
      visit(callee, factor * trip)
  if entry is not None:
    visit(entry, 1)
  return Hlo(comps, mult, trips)


def collective_bytes(hlo: Hlo) -> dict[str, float]:
  """Bytes per chip per step of each collective kind: the result buffer of each op
  (reduce-scatter: its operand), times the loop trip counts around it. Async pairs are
  counted at their -start op (whose result tuple also carries the operands: the larger
  half is taken as the result)."""
  totals = {k: 0.0 for k in COLLECTIVES}
  for name, lines in hlo.comps.items():
    factor = hlo.mult.get(name, 0)
    if not factor:
      continue
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      shape, op = m.group(1), m.group(2)
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in totals:
        continue
      sizes = _array_bytes(shape)
      if kind == "reduce-scatter":
        operands = line[m.end():]
        sizes = _array_bytes(operands.split(")")[0]) or sizes
      elif op.endswith("-start") and len(sizes) > 1:
        sizes = sorted(sizes)[len(sizes) // 2:] if kind == "all-gather" else [max(sizes)]
      totals[kind] += factor * sum(sizes)
  return totals


# Compile and report ------------------------------------------------------------------

def abstract_inputs(cfg, mesh, state_sh, batch_sh, init_fn):
  """ShapeDtypeStructs (with shardings) of the train step's three arguments."""
  state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       state, state_sh)
  row = (cfg.batch_size, cfg.seq_len + 1)
  batch = {k: jax.ShapeDtypeStruct(row, jnp.int32, sharding=batch_sh)
           for k in ("tokens", "segments", "positions")}
  from deepseek_jax.train.step import balance_hparams
  rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
  hparams = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
             for k in balance_hparams(cfg)}
  return state, batch, hparams


def compile_train_step(cfg, mesh):
  """(compiled, abstract train state, compile seconds) of cfg's train step on `mesh`
  (cfg's microbatches resolved for it); raises the compiler's RESOURCE_EXHAUSTED as is."""
  loop.validate_run_config(cfg, mesh)
  model_cfg = model_config_from(cfg.model)
  _, _, state_sh, batch_sh, train_fn, _, init_fn = loop.build_steps(cfg, model_cfg, mesh)
  args = abstract_inputs(cfg, mesh, state_sh, batch_sh, init_fn)
  t0 = time.perf_counter()
  jitted = train_fn.__wrapped__   # loop.build_steps wraps the jitted step in with_mesh
  with jax.set_mesh(mesh):
    compiled = jitted.lower(*args).compile()
  return compiled, args[0], time.perf_counter() - t0


def _per_chip(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (its shard shapes)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _remat_factor(model_cfg) -> float:
  """Forward passes per step over the analytic count's 3 (fwd + 2 x bwd): 4/3 when every
  block recomputes its forward (remat policy "nothing"); 1 when the matmul outputs are
  saved ("dots", "dots_no_batch": what is recomputed is elementwise, plus attention's
  batched products under the latter, which the analytic count leaves out) or nothing is
  recomputed."""
  return 4.0 / 3.0 if model_cfg.remat and model_cfg.remat_policy == "nothing" else 1.0


def report(cfg, topology: str) -> dict:
  """Compile cfg's train step for `topology` and measure it (see the module docstring).
  A program that does not fit comes back with fits_hbm False and the compiler's message."""
  kind, _ = parse_topology(topology)
  chip = CHIPS[kind]
  devices = topology_devices(topology)
  model_cfg = model_config_from(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  cfg = loop.resolve_microbatches(cfg, mesh)
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
               per_chip_bytes=_bytes_from_oom(msg))
    return out
  mem = compiled.memory_analysis()
  args, temps = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  outs, alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
  total = args + temps + outs - alias
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):
    cost = cost[0]
  hlo = read_hlo(compiled.as_text())
  coll = collective_bytes(hlo)
  compute_s = model_flops * _remat_factor(model_cfg) / len(devices) / chip.peak_flops
  ici_s = sum(coll.values()) / chip.ici_bw
  est = max(compute_s, ici_s)
  out.update(
      per_chip_bytes={"arguments": args, "temporaries": temps, "outputs": outs,
                      "aliased": alias, "total": total,
                      # the arguments' two big parts, from the state's shardings
                      "params": _per_chip(state.params),
                      "optimizer": _per_chip(state.opt_state)},
      fits_hbm=bool(total <= chip.hbm_bytes), compile_s=compile_s,
      flops_per_chip=float(cost.get("flops", 0.0)),
      bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
      cost_analysis_note="XLA's cost analysis counts each loop body once "
                         f"(loop trip counts in this program: {sorted(set(hlo.trips))})",
      collective_bytes=coll,
      est_compute_s=compute_s, est_ici_s=ici_s, est_step_s=est,
      est_mfu=model_flops / (len(devices) * chip.peak_flops * est) if est > 0 else 0.0,
      estimate_note="roofline bound: step >= max(analytic FLOPs / peak, collective "
                    "bytes / ICI bandwidth), MFU <= model FLOPs / (chips x peak x step); "
                    "not a measurement")
  return out


def _bytes_from_oom(msg: str) -> dict:
  """The sizes a RESOURCE_EXHAUSTED message gives: "... HLO temporaries (129.86G) exceeds
  available HBM (95.74G)" or "Used 1.24T of 95.74G hbm"."""
  unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  size = r"([\d.]+)([KMGT])"
  for pattern in (rf"\({size}\) exceeds available HBM \({size}\)",
                  rf"[Uu]sed\s+{size}\s+of\s+{size}"):
    m = re.search(pattern, msg)
    if m:
      return {"total": float(m.group(1)) * unit[m.group(2)],
              "limit": float(m.group(3)) * unit[m.group(4)]}
  return {}


def format_report(r: dict) -> str:
  """The table a researcher reads before renting the slice."""
  def gib(b):
    return f"{b / GIB:8.2f} GiB" if abs(b) >= 2 ** 28 else f"{b / 2 ** 20:8.2f} MiB"
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"topology {r['topology']} ({r['n_chips']} chips) | mesh {mesh} | "
           f"batch {r['batch'][0]} x {r['batch'][1]} in {r['microbatches']} microbatch(es) "
           f"| {r['n_layers']} layers",
           f"compile_s: {r['compile_s']:.1f}"]
  b = r.get("per_chip_bytes", {})
  for k in ("params", "optimizer", "arguments", "temporaries", "outputs", "aliased",
            "total"):
    if k in b:
      lines.append(f"  per-chip {k:<12}{gib(b[k])}")
  lines.append(f"  HBM per chip          {gib(r['hbm_bytes_per_chip'])}")
  lines.append(f"fits_hbm: {'true' if r['fits_hbm'] else 'false'}")
  if not r["fits_hbm"]:
    over = b.get("total", 0) - r["hbm_bytes_per_chip"]
    if over > 0:
      lines.append(f"  over by {over / GIB:.2f} GiB per chip")
    if "error" in r:
      lines.append(f"  compiler: {r['error'][:400]}")
    return "\n".join(lines)
  lines.append("collectives per chip per step:")
  for k, v in r["collective_bytes"].items():
    lines.append(f"  {k:<20}{gib(v)}")
  lines.append(f"XLA cost analysis per chip: {r['flops_per_chip']:.3e} FLOPs, "
               f"{r['bytes_accessed_per_chip']:.3e} bytes ({r['cost_analysis_note']})")
  lines.append(f"model FLOPs per step (analytic): {r['model_flops_per_step']:.3e}")
  lines.append(f"ESTIMATE (roofline bound, not measured): step >= {r['est_step_s']:.2f} s "
               f"(compute {r['est_compute_s']:.2f} s at peak, ICI {r['est_ici_s']:.2f} s), "
               f"MFU <= {r['est_mfu']:.3f}")
  return "\n".join(lines)
