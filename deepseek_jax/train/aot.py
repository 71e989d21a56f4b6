"""Ahead-of-time compilation of the train step for a TPU topology, on any host.

libtpu (the `tpu` extra) describes a TPU slice without one: `get_topology_desc` gives its
abstract devices, a Mesh over them takes the config's mesh (one axis may be -1), and
the train step that experiments.train runs (program.build: same function, shardings,
donation, microbatches) is lowered with ShapeDtypeStructs and compiled by the TPU
compiler. What comes back is the compiler's word, not an estimate:

  per-chip memory   arguments, temporaries, outputs (memory_analysis); total = what
                    must be resident = arguments + temporaries + outputs not aliased to
                    (donated) arguments; compared with the chip's HBM
  executed work     from the compiled HLO (train/hlo.py), per chip per step, every loop
                    at its trip count: FLOPs by class (routed experts, attention, other,
                    remat recompute; grouped-matmul kernels at the tiles their live rows
                    touch, the overflow rounds at their balanced count), beside the
                    analytic useful FLOPs of each class; HBM bytes; collective bytes

A roofline step time follows from those three with the chip's constants: compute =
executed FLOPs / peak, HBM = bytes / HBM bandwidth, ICI = collective bytes / ICI
bandwidth, step = the largest (perfect overlap): a lower bound on the step, and
roofline MFU = useful FLOPs / (chips x peak x step) an upper bound. XLA's own cost
analysis (each loop body once, kernels at their static estimate) is kept for reference.
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
from deepseek_jax.model.partitioning import BATCH
from deepseek_jax.train import hlo, program as program_lib, sharding
from deepseek_jax.train.metrics import train_flops_per_token, useful_flops_by_class

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float      # bf16 FLOP/s
  hbm_bytes: float
  ici_bw: float          # bytes/s per chip, bidirectional
  hbm_bw: float          # bytes/s
  source: str


# Public per-chip numbers (Cloud TPU system architecture pages, read 2026-12).
CHIPS = {
    # HBM: the 95.74 GiB the TPU compiler reports available (the page says 95 GiB).
    "v5p": Chip(459e12, 95.74 * GIB, 1200e9, 2765e9,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at "
                "2765 GB/s (95.74 GiB available per the TPU compiler), 1200 GB/s "
                "bidirectional ICI per chip"),
    "v6e": Chip(918e12, 32e9, 800e9, 1638e9,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, "
                "800 GB/s bidirectional ICI per chip"),
    "v5e": Chip(197e12, 16e9, 400e9, 819e9,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, "
                "400 GB/s bidirectional ICI per chip"),
    "v4": Chip(275e12, 32 * GIB, 1.1e15 / 4096, 1200e9,
               "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; "
               "ICI per chip taken as the pod's 1.1 PB/s all-reduce bandwidth / 4096 chips"),
}
_DIMS = {"v5p": 3, "v4": 3, "v6e": 2, "v5e": 2}
COLLECTIVES = hlo.COLLECTIVES


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
  program_lib.validate_run_config(cfg, mesh)
  program = program_lib.build(cfg, model_config_from(cfg.model), mesh)
  args = abstract_inputs(cfg, mesh, program.state_sh, program.batch_sh, program.init_fn)
  t0 = time.perf_counter()
  jitted = program.train_fn.__wrapped__   # build wraps the jitted step in with_mesh
  with jax.set_mesh(mesh):
    compiled = jitted.lower(*args).compile()
  return compiled, args[0], time.perf_counter() - t0


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (its shard shapes)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def replicated_state(state, mesh, top: int = 5) -> dict:
  """What of the train state a chip holds beyond its share: every parameter whose
  sharding leaves out a mesh axis of size > 1 other than "data" (whole replicas by
  design) is replicated over it. Per chip: the bytes of such parameters with their two
  AdamW moments, the excess over sharding them over those axes too, and the largest."""
  rows = []
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    used = {a for entry in x.sharding.spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))}
    unused = [a for a, n in mesh.shape.items() if n > 1 and a != "data" and a not in used]
    if not unused:
      continue
    per_chip = 3 * math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    excess = per_chip * (1 - 1 / math.prod(mesh.shape[a] for a in unused))
    rows.append((excess, jax.tree_util.keystr(path), unused, x.shape))
  rows.sort(key=lambda r: -r[0])
  return {"excess_bytes_per_chip": sum(r[0] for r in rows), "n_params": len(rows),
          "largest": [{"param": p, "replicated_over": u, "shape": list(sh),
                       "excess_bytes_per_chip": e} for e, p, u, sh in rows[:top]]}


def routed_rows_per_buffer(cfg, model_cfg, mesh) -> float:
  """Rows a routed grouped-matmul buffer holds at balanced routing: the tokens one shard
  routes per microbatch (the batch over microbatches and over every axis that splits
  tokens: the batch axes, and "tensor" when it splits the MoE's sequence) times K; under
  expert parallelism each shard receives as many as it sends."""
  shards = math.prod(mesh.shape.get(a, 1) for a in BATCH)
  tensor = mesh.shape.get("tensor", 1)
  if tensor > 1 and cfg.seq_len % tensor == 0:
    shards *= tensor
  tokens = cfg.batch_size * cfg.seq_len / max(int(cfg.microbatches), 1) / shards
  return tokens * model_cfg.top_k


def read_routing_counts(path: str):
  """Per-layer expert counts [L, E] from a run's metrics.jsonl (its last record with the
  evaluation's "val_load") or a JSON file: a list of rows, or an object with "load" or
  "val_load"."""
  import json
  import numpy as np
  with open(path) as fh:
    text = fh.read()
  found = None
  try:
    found = json.loads(text)
  except json.JSONDecodeError:
    for line in text.splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and "val_load" in rec:
        found = rec
  if isinstance(found, dict):
    found = found.get("val_load", found.get("load"))
  counts = np.asarray(found if found is not None else [], dtype=np.float64)
  if counts.ndim != 2 or counts.size == 0:
    raise ValueError(f"--routing_counts={path}: no per-layer expert counts found (a "
                     "metrics.jsonl with an evaluation's val_load, or JSON [[count per "
                     "expert] per layer])")
  return counts


def routing_rounds(counts_LE, cfg, model_cfg, mesh) -> dict:
  """What a routing with these per-layer expert loads costs the ragged exchange on this
  mesh, from expected loads (each microbatch routing like the whole count): the hottest
  expert-axis shard of layer l receives h_l = Z x its share of the assignments times
  the balanced X K rows, so it runs ceil(h_l X K / buffer) rounds (every shard runs the
  layer's maximum), its grouped matmuls hold min(h_l X K, buffer) rows a round."""
  import numpy as np
  from deepseek_jax.model import ragged_exchange
  E, Z = model_cfg.n_routed_experts, mesh.shape.get("expert", 1)
  if counts_LE.shape[1] != E:
    raise ValueError(f"--routing_counts: {counts_LE.shape[1]} experts per layer, but the "
                     f"model has {E}: use counts of a run of this model")
  balanced = routed_rows_per_buffer(cfg, model_cfg, mesh)
  X = balanced / model_cfg.top_k
  cap = (ragged_exchange.receive_rows(int(round(X)), model_cfg, Z)
         if model_cfg.ep_exchange == "ragged" and Z > 1 else balanced)
  share_LZ = counts_LE.reshape(len(counts_LE), Z, E // Z).sum(-1)
  share_LZ = share_LZ / np.maximum(share_LZ.sum(-1, keepdims=True), 1e-30)
  hot_L = Z * share_LZ.max(-1)
  rows_L = hot_L * balanced
  rounds_L = np.maximum(1, np.ceil(rows_L / cap - 1e-9))
  return {"layers": len(counts_LE), "hot_shard_load": hot_L.round(4).tolist(),
          "rounds": rounds_L.astype(int).tolist(), "buffer_rows": int(cap),
          "balanced_rows": balanced,
          "mean_extra_rounds": float(np.mean(rounds_L - 1)),
          "mean_first_round_rows": float(np.mean(np.minimum(rows_L, cap)))}


def causal_live_fraction(model_cfg, seq_len: int) -> float:
  """The blockwise attention's live tiles: query block i reads key blocks 0..i of n."""
  if not model_cfg.attention_impl.startswith("blockwise"):
    return 1.0
  n = max(1, math.ceil(seq_len / model_cfg.attention_block))
  return (n + 1) / (2 * n)


def context_report(hlo_text: str, cfg, model_cfg, mesh) -> dict | None:
  """Under a context axis: the all-gathers whose operand is MLA's latent (last dim
  R + P), their bytes per chip per step read from the compiled program, what gathering
  per-head K and V instead would move (the same tokens at N_local (H + P + O) values),
  and the causal work per context shard (blockwise tiles) in the zig-zag layout the
  model uses beside contiguous shards. None without a context axis."""
  n = mesh.shape.get("context", 1)
  if n == 1:
    return None
  h = hlo.read_hlo(hlo_text)
  width = model_cfg.kv_lora_rank + model_cfg.qk_rope_head_dim
  ops, runs, moved, shapes = 0, 0, 0.0, set()
  for name, instrs in h.comps.items():
    factor = h.mult.get(name, 0)
    for instr in instrs:
      if instr.op not in ("all-gather", "all-gather-start"):
        continue
      found = hlo.arrays(instr.shape)
      if not found or not all(ds and ds[-1] == width for _, ds in found):
        continue
      ops, runs = ops + 1, runs + factor
      moved += factor * max(hlo.array_bytes(instr.shape))
      dtype, ds = found[-1]
      shapes.add(f"{dtype}[{','.join(map(str, ds))}]")
  tensor = mesh.shape.get("tensor", 1)
  n_local = model_cfg.n_heads // tensor if model_cfg.n_heads % tensor == 0 else model_cfg.n_heads
  per_head = n_local * (model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim
                        + model_cfg.v_head_dim)
  from deepseek_jax.model.context_parallel import shard_live_tiles
  block = (model_cfg.attention_block if model_cfg.attention_impl.startswith("blockwise")
           else cfg.seq_len)
  tiles = {"zigzag": shard_live_tiles(cfg.seq_len, n, block, zigzag=True),
           "contiguous": shard_live_tiles(cfg.seq_len, n, block, zigzag=False)}
  return {"context": n, "latent_width": width, "latent_all_gathers": ops,
          "latent_gathers_per_step": runs, "latent_gather_shapes": sorted(shapes),
          "latent_bytes_per_chip": moved, "per_head_kv_width": per_head,
          "per_head_kv_bytes_per_chip": moved * per_head / width,
          "shard_live_tiles": tiles,
          "busiest_over_mean": {k: max(v) * len(v) / sum(v) for k, v in tiles.items()}}


def work_report(hlo_text: str, cfg, model_cfg, chip: Chip, n_chips: int,
                live: float | None, routing: dict | None = None) -> dict:
  """Executed vs useful work per chip per step, HBM and collective bytes, and the
  roofline step (see the module docstring) of a compiled step's HLO text; live: the rows
  a routed grouped-matmul buffer holds at balanced routing (routed_rows_per_buffer;
  None: its whole grid), or `routing` (routing_rounds: the hottest shard's rows and the
  layers' mean extra rounds, each overflow round's kernels counted as full as the
  first)."""
  h = hlo.read_hlo(hlo_text)
  extra_rounds = 0.0
  if routing is not None:
    live, extra_rounds = routing["mean_first_round_rows"], routing["mean_extra_rounds"]
  coll = hlo.collective_bytes(h, overflow_rounds=extra_rounds)
  work = hlo.executed_work(h, live_rows=live, overflow_rounds=extra_rounds,
                           attention_live=causal_live_fraction(model_cfg, cfg.seq_len))
  tokens_per_chip = cfg.batch_size * cfg.seq_len / n_chips
  useful = {k: v * tokens_per_chip
            for k, v in useful_flops_by_class(model_cfg, cfg.seq_len).items()}
  by_class = {k: {"executed": float(work.flops.get(k, 0.0)),
                  "recomputed": float(work.flops.get(k + "/recompute", 0.0)),
                  "useful": useful[k]} for k in hlo.CLASSES}
  by_class["remat_recompute"] = {
      "executed": sum(v["recomputed"] for v in by_class.values()), "useful": 0.0}
  executed, useful_total = work.total_flops, sum(useful.values())
  compute_s = executed / chip.peak_flops
  hbm_s = work.hbm_bytes / chip.hbm_bw
  ici_s = sum(coll.values()) / chip.ici_bw
  step_s = max(compute_s, hbm_s, ici_s)
  return {
      "executed_flops_per_chip": executed, "useful_flops_per_chip": useful_total,
      "flops_by_class": by_class, "hbm_traffic_bytes_per_chip": work.hbm_bytes,
      "collective_bytes": coll,
      "roofline": {"compute_s": compute_s, "hbm_s": hbm_s, "ici_s": ici_s,
                   "step_s": step_s,
                   "mfu": useful_total / (chip.peak_flops * step_s) if step_s else 0.0},
      "work_notes": work.notes + [
          f"routed grouped-matmul buffers counted at "
          f"{'their whole grid' if live is None else f'{live:,.0f} live rows'} "
          f"({'the given routing, hottest shard' if routing else 'balanced routing'}); "
          f"overflow rounds beyond the first: {extra_rounds:g}",
          f"loop trip counts in this program: {sorted(set(h.trips))}"],
      "roofline_note": "a bound: step >= max(executed FLOPs / peak, HBM bytes / HBM "
                       "bandwidth, collective bytes / ICI bandwidth), perfect overlap; "
                       "not a measurement"}


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
               per_chip_bytes=_bytes_from_oom(msg))
    return out
  mem = compiled.memory_analysis()
  args, temps = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  outs, alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
  total = args + temps + outs - alias
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):
    cost = cost[0]
  hlo_text = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as fh:
      fh.write(hlo_text)
  out.update(
      per_chip_bytes={"arguments": args, "temporaries": temps, "outputs": outs,
                      "aliased": alias, "total": total,
                      # the arguments' two big parts, from the state's shardings
                      "params": per_chip_bytes(state.params),
                      "optimizer": per_chip_bytes(state.opt_state)},
      replicated=replicated_state(state, mesh),
      fits_hbm=bool(total <= chip.hbm_bytes), compile_s=compile_s,
      xla_cost_analysis={"flops": float(cost.get("flops", 0.0)),
                         "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                         "note": "XLA's own count: each loop body once, kernels at "
                                 "their static estimate; for reference only"})
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
  rep = r.get("replicated")
  if rep:
    lines.append(f"  replicated weights (with AdamW) beyond their share: "
                 f"{gib(rep['excess_bytes_per_chip']).strip()} per chip, "
                 f"{rep['n_params']} parameters")
    for row in rep["largest"]:
      if row["excess_bytes_per_chip"] >= 2 ** 20:
        lines.append(f"    {row['param']} {row['shape']} over "
                     f"{','.join(row['replicated_over'])}: "
                     f"{gib(row['excess_bytes_per_chip']).strip()}")
  lines.append(f"fits_hbm: {'true' if r['fits_hbm'] else 'false'}")
  if not r["fits_hbm"]:
    over = b.get("total", 0) - r["hbm_bytes_per_chip"]
    if over > 0:
      lines.append(f"  over by {over / GIB:.2f} GiB per chip")
    if "error" in r:
      lines.append(f"  compiler: {r['error'][:400]}")
    return "\n".join(lines)
  lines += format_work(r)
  if "context" in r:
    c = r["context"]
    lines.append(
        f"context parallelism over {c['context']} shards: {c['latent_all_gathers']} "
        f"all-gathers of the latent (last dim {c['latent_width']}: "
        f"{', '.join(c['latent_gather_shapes'])}), run {c['latent_gathers_per_step']} "
        f"times a step, {gib(c['latent_bytes_per_chip']).strip()} a chip; per-head K/V "
        f"({c['per_head_kv_width']} wide) would be "
        f"{gib(c['per_head_kv_bytes_per_chip']).strip()}")
    t = c["shard_live_tiles"]
    lines.append(f"  causal attention tiles per context shard: zig-zag {t['zigzag']} "
                 f"(busiest {c['busiest_over_mean']['zigzag']:.2f}x the mean); contiguous "
                 f"shards would run {t['contiguous']} "
                 f"({c['busiest_over_mean']['contiguous']:.2f}x)")
  if "routing" in r:
    g, b = r["routing"], r["balanced"]
    lines.append(f"the given routing ({g['layers']} layers): hottest expert shard "
                 f"{min(g['hot_shard_load']):.2f}-{max(g['hot_shard_load']):.2f}x the "
                 f"balanced load, rounds per layer {min(g['rounds'])}-{max(g['rounds'])} "
                 f"(mean extra {g['mean_extra_rounds']:.2f}); routed experts executed "
                 f"{r['flops_by_class']['routed_experts']['executed']:.4g} vs "
                 f"{b['flops_by_class']['routed_experts']['executed']:.4g} balanced, "
                 f"roofline step {r['roofline']['step_s']:.2f} vs "
                 f"{b['roofline']['step_s']:.2f} s")
  return "\n".join(lines)


def gib(b: float) -> str:
  return f"{b / GIB:8.2f} GiB" if abs(b) >= 2 ** 28 else f"{b / 2 ** 20:8.2f} MiB"


def format_work(r: dict) -> list[str]:
  """The executed-work lines of a report: FLOPs by class, HBM, collectives, notes and
  the roofline."""
  lines = []
  lines.append("executed vs useful FLOPs per chip per step (executed: first passes; "
               "recomputed: the remat's forward again):")
  for k, v in r["flops_by_class"].items():
    if k == "remat_recompute":
      continue
    ratio = (v["executed"] + v["recomputed"]) / v["useful"]
    lines.append(f"  {k:<16}{v['executed']:11.4g} executed {v['recomputed']:11.4g} "
                 f"recomputed {v['useful']:11.4g} useful  {ratio:5.2f}x "
                 f"({v['executed'] / v['useful']:.2f}x without the recompute)")
  lines.append(f"  {'total':<18}{r['executed_flops_per_chip']:12.4g} executed "
               f"{r['useful_flops_per_chip']:12.4g} useful "
               f"{r['executed_flops_per_chip'] / r['useful_flops_per_chip']:6.2f}x")
  lines.append(f"HBM traffic per chip per step: {gib(r['hbm_traffic_bytes_per_chip'])} "
               "(estimate)")
  lines.append("collectives per chip per step:")
  for k, v in r["collective_bytes"].items():
    lines.append(f"  {k:<20}{gib(v)}")
  for note in r.get("work_notes", []):
    lines.append(f"  note: {note}")
  rf = r["roofline"]
  lines.append(f"ROOFLINE (a bound, not measured): step >= {rf['step_s']:.2f} s (compute "
               f"{rf['compute_s']:.2f} s, HBM {rf['hbm_s']:.2f} s, ICI {rf['ici_s']:.2f} s), "
               f"roofline_mfu {rf['mfu']:.3f}")
  return lines
