"""What one chip executes per step: FLOPs by class and HBM bytes, from the compiled HLO.

XLA's cost analysis counts every loop body once and takes a kernel's own static estimate
(a grouped matmul's dense 2 M K N), so it cannot say what a step executes. This module
walks the program read by train/hlo.py instead, every loop at its trip count:

  FLOPs        every convolution and dot (the TPU compiler writes matmuls as
               convolutions: counted by valid window positions, as XLA's cost analysis
               does) and every Mosaic kernel (a Pallas call or XLA's own ragged-dot
               kernel: train/hlo_kernels.py decodes its body, FLOPs = grid steps x the
               matmul of a step; a grouped matmul at the tiles its live rows touch).
               A conditional inside attention (the blockwise kernel's causal skip) counts
               its heavier branch at the causal live fraction the caller gives.
  HBM bytes    every top-level op (not inside a fusion) reads its operands and writes its
               result; a fusion reads only the slices it dynamic-slices of an operand and
               writes only what it dynamic-update-slices; bookkeeping ops (tuples,
               bitcasts, parameters, ...) move nothing. An estimate, trip-weighted.

Each FLOP is classed by the op_name JAX wrote for it: `routed_experts` (grouped-matmul
kernels, and products under /moe/ other than the shared experts and the router),
`attention` (/attn), `other`; and within each class, what is the forward recomputed in
the backward ("rematted_computation": class + "/recompute").
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from deepseek_jax.train.hlo import (OVERFLOW_LOOP, Hlo, Instr, array_bytes, dims,
                                    while_trip)
from deepseek_jax.train.hlo_kernels import decode_kernel, grouped_tiles

# FLOP classes; each also counts, apart, what the remat recomputes of it.
CLASSES = ("routed_experts", "attention", "other")
# Ops that move no HBM bytes of their own.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "iota",
               "copy-done", "call-done", "all-gather-done", "all-reduce-done",
               "collective-permute-done", "async-done", "opt-barrier", "add-dependency"}


# FLOPs of one instruction ------------------------------------------------------------

def _window(instr: Instr) -> dict:
  """window={size=4 stride=3 pad=0_0x3_3 lhs_dilate=4 ...} -> {key: [ints per dim]}."""
  w = instr.attr("window") or ""
  out = {}
  for key, val in re.findall(r"(\w+)=([\d_x]+)", w):
    out[key] = [tuple(int(p) for p in v.split("_")) if "_" in v else int(v)
                for v in val.split("x")]
  return out


def _valid_pairs(n_in, n_out, k, stride, pad_lo, lhs_dil, rhs_dil) -> int:
  """(output position, kernel position) pairs of one spatial dim that read an input
  element (not padding, not a dilation hole)."""
  last = (n_in - 1) * lhs_dil
  count = 0
  for o in range(n_out):
    for j in range(k):
      p = o * stride - pad_lo + j * rhs_dil
      if 0 <= p <= last and p % lhs_dil == 0:
        count += 1
  return count


def conv_flops(instr: Instr, shapes: dict) -> float:
  """2 x multiply-adds of a convolution: rhs input features x every output element x
  the kernel positions that read input, per spatial dim (XLA's own count)."""
  labels = instr.attr("dim_labels")
  if not labels or len(instr.operands) < 2:
    return 0.0
  lhs_l, rest = labels.split("_", 1)
  rhs_l, out_l = rest.split("->")
  lhs, rhs, out = (dims(shapes.get(instr.operands[0], "")),
                   dims(shapes.get(instr.operands[1], "")), dims(instr.shape))
  if not (lhs and rhs and out):
    return 0.0
  w = _window(instr)
  n_sp = sum(c.isdigit() for c in out_l)
  get = lambda key, d, default: (w.get(key, [default] * n_sp) + [default] * n_sp)[d]
  spatial = 1
  for d in range(n_sp):
    c = str(d)
    pad = get("pad", d, (0, 0))
    spatial *= _valid_pairs(lhs[lhs_l.index(c)], out[out_l.index(c)], rhs[rhs_l.index(c)],
                            get("stride", d, 1), pad[0], get("lhs_dilate", d, 1),
                            get("rhs_dilate", d, 1))
  non_spatial = math.prod(out[i] for i, c in enumerate(out_l) if not c.isdigit())
  return 2.0 * rhs[rhs_l.index("i")] * non_spatial * spatial


def dot_flops(instr: Instr, shapes: dict) -> float:
  lhs = dims(shapes.get(instr.operands[0], "")) if instr.operands else []
  contracting = instr.attr("lhs_contracting_dims") or "{}"
  k = math.prod(lhs[int(i)] for i in re.findall(r"\d+", contracting)) if lhs else 0
  return 2.0 * math.prod(dims(instr.shape)) * k



# FLOP classes -----------------------------------------------------------------------

def flop_class(op_name: str, kernel: bool = False) -> str:
  """The class of a product from its op_name, with "/recompute" appended when it is the
  forward recomputed in the backward ("rematted_computation")."""
  base = _base_class(op_name.replace("rematted_computation", ""), kernel)
  return base + "/recompute" if "rematted_computation" in op_name else base


def _base_class(op_name: str, kernel: bool) -> str:
  if kernel and ("ragged" in op_name or "gmm" in op_name or "/moe/" in op_name
                 or not op_name):
    return "routed_experts"
  if "/moe/" in op_name and "/moe/shared" not in op_name and not re.search(
      r"/moe/dot_general$", op_name):
    return "routed_experts"
  if "/attn" in op_name or "attention" in op_name:
    return "attention"
  return "other"


@dataclasses.dataclass
class Work:
  """Per chip per step: FLOPs by class, HBM bytes, and notes on what was assumed."""
  flops: collections.Counter
  hbm_bytes: float
  hbm_by_op: collections.Counter   # the largest contributors: op (fusions by their name)
  kernels: list            # (name, class, executed FLOPs, static-grid FLOPs) per call site
  notes: list

  @property
  def total_flops(self) -> float:
    return float(sum(self.flops.values()))


# HBM bytes and the walk -------------------------------------------------------------

def _fusion_bytes(instr: Instr, hlo: Hlo) -> float:
  """HBM bytes a fusion moves: per operand, the slices its fused computation takes of it
  when every use is a dynamic-slice (or the in-place target of a dynamic-update-slice:
  then only the update), else the whole operand; the result, or only the updates when
  the root is a dynamic-update-slice (in place)."""
  callee = (instr.attr("calls") or "").lstrip("%")
  body = hlo.comps.get(callee)
  if body is None:
    return sum(array_bytes(instr.shape)) + sum(
        sum(array_bytes(hlo.shapes.get(o, ""))) for o in instr.operands)
  params = {}
  for i in body:
    if i.op == "parameter":
      params[i.name] = int(re.search(r"parameter\((\d+)\)", i.line).group(1))
  users = collections.defaultdict(list)
  for i in body:
    for pos, o in enumerate(i.operands):
      users[o].append((i, pos))
  total = 0.0
  for pname, idx in params.items():
    if idx >= len(instr.operands):
      continue
    full = sum(array_bytes(hlo.shapes.get(instr.operands[idx], "")))
    us = users.get(pname, [])
    if us and all(u.op == "dynamic-slice" and pos == 0 for u, pos in us):
      total += sum(sum(array_bytes(u.shape)) for u, _ in us)
    elif us and all(u.op == "dynamic-update-slice" and pos == 0 for u, pos in us):
      total += 0.0   # written in place below
    else:
      total += full
  root = next((i for i in body if i.line.lstrip().startswith("ROOT")), None)
  if root is not None and root.op == "dynamic-update-slice":
    total += sum(array_bytes(hlo.shapes.get(root.operands[1], "")))   # written in place
  else:
    total += sum(array_bytes(instr.shape))
  return total


def op_bytes(instr: Instr, hlo: Hlo) -> float:
  """HBM bytes one top-level op moves: a fusion what it slices and writes
  (_fusion_bytes), a dynamic slice or update its slice read and written, bookkeeping
  nothing, any other op its operands and its result."""
  if instr.op == "fusion":
    return _fusion_bytes(instr, hlo)
  if instr.op == "dynamic-slice":
    return 2 * sum(array_bytes(instr.shape))
  if instr.op == "dynamic-update-slice":
    return 2 * sum(array_bytes(hlo.shapes.get(instr.operands[1], "")))
  if instr.op not in _NO_TRAFFIC:
    return sum(array_bytes(instr.shape)) + sum(
        sum(array_bytes(hlo.shapes.get(o, ""))) for o in instr.operands)
  return 0.0


def _branches(instr: Instr) -> list[str]:
  """The branch computations of a conditional."""
  return [b.strip().lstrip("%") for b in
          (instr.attr("branch_computations") or "").strip("{}").split(",") if b]


class _Walk:
  """One count of what a program executes, under the caller's assumptions (see
  executed_work): the FLOPs of each computation, memoised by (name, the op_name it
  inherits) so that a computation's kernels are listed once; the HBM bytes so far; the
  kernels, notes and data-dependent loops met on the way."""

  def __init__(self, hlo: Hlo, live_rows: float | None, overflow_rounds: float,
               attention_live: float):
    self.hlo, self.live_rows = hlo, live_rows
    self.overflow_rounds, self.attention_live = overflow_rounds, attention_live
    self.kernels, self.notes = [], []
    self.hbm = 0.0
    self.hbm_by = collections.Counter()
    self.dynamic_seen = set()
    self._comp_flops = {}

  def branch_weights(self, instr: Instr, branches, inherited: str = "") -> list[float]:
    """Runs per conditional of each branch: the heavier one at attention_live under
    attention (the rest at 1 - attention_live), else the heavier one once."""
    costs = [sum(self.comp_flops(b, inherited).values()) for b in branches]
    heavy = max(range(len(branches)), key=costs.__getitem__)
    attn = "/attn" in (instr.op_name or inherited)
    live = self.attention_live if attn else 1.0
    return [live if i == heavy else (1.0 - live if attn else 0.0)
            for i in range(len(branches))]

  def comp_flops(self, name: str, inherited: str = "") -> collections.Counter:
    """FLOPs of one run of a computation, by class (trips inside included). inherited:
    the op_name of the op that called it (a fusion's products often carry none)."""
    key = (name, inherited)
    if key not in self._comp_flops:
      self._comp_flops[key] = self._count_comp_flops(name, inherited)
    return self._comp_flops[key]

  def _count_comp_flops(self, name: str, inherited: str) -> collections.Counter:
    out = collections.Counter()
    instrs = self.hlo.comps.get(name, [])
    # XLA's ragged-dot transpose (the weight gradient) is a product of per-group masked
    # operands in a fusion with an `output_mask` parameter and no op_name.
    masked = any(i.op == "parameter" and i.name.startswith("output_mask") for i in instrs)
    for instr in instrs:
      op_name = instr.op_name or ("ragged_dot_transpose/moe/" if masked else inherited)
      for cls, v in self.instr_flops(instr, op_name).items():
        out[cls] += v
    return out

  def instr_flops(self, instr: Instr, op_name: str) -> collections.Counter:
    """FLOPs of one run of an instruction, by class, what it calls included."""
    out = collections.Counter()
    if instr.op == "convolution":
      out[flop_class(op_name)] += conv_flops(instr, self.hlo.shapes)
    elif instr.op == "dot":
      out[flop_class(op_name)] += dot_flops(instr, self.hlo.shapes)
    elif instr.op == "custom-call" and '"body":"' in instr.line:
      return self.kernel_flops(instr, op_name)
    elif instr.op == "while":
      return self.loop_flops(instr, op_name)
    elif instr.op == "conditional":
      branches = _branches(instr)
      for b, w in zip(branches, self.branch_weights(instr, branches, op_name)):
        for cls, v in self.comp_flops(b, op_name).items():
          out[cls] += w * v
    elif instr.op in ("fusion", "call", "call-start", "async-start", "custom-call"):
      callee = instr.attr("calls") or instr.attr("to_apply")
      if callee:
        for cls, v in self.comp_flops(callee.lstrip("%"), op_name).items():
          out[cls] += v
    return out

  def kernel_flops(self, instr: Instr, op_name: str) -> collections.Counter:
    """A Mosaic kernel: grid steps x the FLOPs of a step; a dynamic grid dimension (a
    grouped matmul) at the tiles its live rows touch (routed experts: live_rows)."""
    out = collections.Counter()
    body = re.search(r'"body":"([^"]+)"', instr.line).group(1)
    k = decode_kernel(body)
    static = math.prod(g for g in k.grid if g is not None) if k.grid else 1
    steps = static
    cls = flop_class(op_name, kernel=True)
    if k.step_flops and None in k.grid:
      routed = cls.startswith("routed_experts")
      visited, at_most = grouped_tiles(instr, k, self.live_rows if routed else None)
      if visited is None:
        visited = at_most = 1
        self.notes.append(f"kernel {instr.name}: dynamic grid without group metadata, "
                          "counted as one step per static grid point")
      steps = static * visited
      self.kernels.append((instr.name, cls, steps * k.step_flops, static * at_most
                           * k.step_flops))
    out[cls] += steps * k.step_flops
    return out

  def loop_flops(self, instr: Instr, op_name: str) -> collections.Counter:
    """A while loop: its body's FLOPs times its trips (the overflow rounds' loops at
    overflow_rounds; a data-dependent loop once, noted)."""
    out = collections.Counter()
    body = (instr.attr("body") or "").lstrip("%")
    if OVERFLOW_LOOP in op_name:
      trip = self.overflow_rounds
    else:
      trip = while_trip(instr, self.hlo.comps)
      if trip is None:
        self.dynamic_seen.add(op_name or instr.name)
        trip = 1
    for cls, v in self.comp_flops(body, op_name).items():
      out[cls] += trip * v
    return out

  def walk_bytes(self, name: str, factor: float):
    """HBM bytes of the top-level ops of a computation and what it calls (not fusions'
    insides), times `factor` runs."""
    for instr in self.hlo.comps.get(name, []):
      if instr.op == "while":
        body = (instr.attr("body") or "").lstrip("%")
        trip = self.overflow_rounds if OVERFLOW_LOOP in instr.op_name else (
            while_trip(instr, self.hlo.comps) or 1)
        self.walk_bytes(body, factor * trip)
      elif instr.op == "conditional":
        branches = _branches(instr)
        for b, w in zip(branches, self.branch_weights(instr, branches, instr.op_name)):
          self.walk_bytes(b, factor * w)
      elif instr.op in ("call", "call-start", "async-start"):
        callee = (instr.attr("calls") or instr.attr("to_apply") or "").lstrip("%")
        self.walk_bytes(callee, factor)
      else:
        b = op_bytes(instr, self.hlo)
        self.hbm += factor * b
        if b:
          self.hbm_by[f"{instr.op}:{instr.name}"] += factor * b


def executed_work(hlo: Hlo, live_rows: float | None = None, overflow_rounds: float = 0.0,
                  attention_live: float = 1.0) -> Work:
  """What one chip executes per step (see the module docstring). live_rows: rows a
  routed grouped-matmul buffer holds (None: count its whole grid); overflow_rounds:
  trips of the overflow-rounds loops; attention_live: the fraction of an attention
  conditional's heavy branch that runs (the causal tiles)."""
  walk = _Walk(hlo, live_rows, overflow_rounds, attention_live)
  flops = collections.Counter()
  if hlo.entry is not None:
    flops = walk.comp_flops(hlo.entry)
    walk.walk_bytes(hlo.entry, 1.0)
  if walk.dynamic_seen:
    walk.notes.append("loops with a data-dependent trip count, counted once: "
                      + "; ".join(sorted(walk.dynamic_seen))[:500])
  return Work(collections.Counter(flops), walk.hbm, walk.hbm_by, walk.kernels, walk.notes)
