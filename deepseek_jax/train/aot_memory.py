"""A compiled program's per-chip memory: what must be resident, what a sharded tree holds,
the weights replicated beyond their share, and the sizes an out-of-memory message gives.

The compiler's word, not an estimate: memory_analysis gives the arguments, temporaries
and outputs; total = what must be resident = arguments + temporaries + outputs not
aliased to (donated) arguments; compared with the chip's HBM.
"""

from __future__ import annotations

import math
import re

import jax

from deepseek_jax.train.tpu import GIB


def memory_breakdown(compiled, state, mesh, hbm_bytes: float) -> dict:
  """The report's memory fields of a compiled train step (state: its abstract, sharded
  train state): per-chip bytes, the replicated weights, and whether they fit."""
  mem = compiled.memory_analysis()
  args, temps = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  outs, alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
  total = args + temps + outs - alias
  return {"per_chip_bytes": {"arguments": args, "temporaries": temps, "outputs": outs,
                             "aliased": alias, "total": total,
                             # the arguments' two big parts, from the state's shardings
                             "params": per_chip_bytes(state.params),
                             "optimizer": per_chip_bytes(state.opt_state)},
          "replicated": replicated_state(state, mesh),
          "fits_hbm": bool(total <= hbm_bytes)}


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


def bytes_from_oom(msg: str) -> dict:
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


def gib(b: float) -> str:
  return f"{b / GIB:8.2f} GiB" if abs(b) >= 2 ** 28 else f"{b / 2 ** 20:8.2f} MiB"


def mesh_text(mesh: dict) -> str:
  """A compile report's mesh: 'data=1 expert=64 tensor=2'."""
  return " ".join(f"{k}={v}" for k, v in mesh.items())


def per_chip_lines(per_chip: dict, keys=None) -> list[str]:
  """A compile report's memory lines ('  per-chip NAME  SIZE'), in the order of `keys`
  (those present) or of per_chip."""
  return [f"  per-chip {k:<12}{gib(per_chip[k])}" for k in (keys or per_chip)
          if k in per_chip]
