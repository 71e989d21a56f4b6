"""Reading a compiled program's HLO text: what one chip executes per step.

XLA's cost analysis counts every loop body once and takes a kernel's own static estimate
(a grouped matmul's dense 2 M K N), so it cannot say what a step executes. This module
walks the optimised HLO (`compiled.as_text()`, the per-chip SPMD program) instead:

  trips        every while loop's trip count: XLA's known_trip_count, else a scan's
               `i < N` condition; a loop whose count is data-dependent is counted once,
               except the expert-parallel overflow rounds (their while carries the name
               `OVERFLOW_LOOP`), counted at the extra rounds the caller gives (0 at
               balanced routing).
  collectives  bytes per chip per step of each collective kind (the result buffer;
               reduce-scatter: its operand), times the trips around it.
  FLOPs        every convolution and dot (the TPU compiler writes matmuls as
               convolutions: counted by valid window positions, as XLA's cost analysis
               does) and every Mosaic kernel (a Pallas call or XLA's own ragged-dot
               kernel: its body is decoded, FLOPs = grid steps x the matmul of a step).
               A grouped-matmul kernel's grid has one dynamic dimension, the tiles of
               rows that hold a group (its metadata operands: group offsets [G + 1],
               group ids and tile ids [T = m tiles + G - 1]); it is counted at the tiles
               `live_rows` rows in G equal groups touch, not at its static buffer.
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

import base64
import collections
import dataclasses
import functools
import math
import re

from deepseek_jax.model.ragged_exchange import OVERFLOW_SCOPE

# FLOP classes; each also counts, apart, what the remat recomputes of it.
CLASSES = ("routed_experts", "attention", "other")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")
# The while loops of the overflow rounds carry this in their op_name.
OVERFLOW_LOOP = OVERFLOW_SCOPE

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
             "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)"
                      r"|branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_INT_CONST = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Ops that move no HBM bytes of their own.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "iota",
               "copy-done", "call-done", "all-gather-done", "all-reduce-done",
               "collective-permute-done", "async-done", "opt-barrier", "add-dependency"}


@dataclasses.dataclass(frozen=True)
class Instr:
  name: str
  shape: str          # the result type's text
  op: str
  operands: tuple     # operand instruction names
  line: str

  @property
  def op_name(self) -> str:
    m = _OP_NAME.search(self.line)
    return m.group(1) if m else ""

  def attr(self, key: str) -> str | None:
    """The text of attribute `key` (a {...} value whole, nested braces included)."""
    m = re.search(rf"[\s,]{key}=", self.line)
    if not m:
      return None
    i = m.end()
    if self.line[i:i + 1] != "{":
      return re.match(r"[^,\s]+", self.line[i:]).group(0)
    depth = 0
    for j in range(i, len(self.line)):
      depth += {"{": 1, "}": -1}.get(self.line[j], 0)
      if depth == 0:
        return self.line[i:j + 1]
    return self.line[i:]


def _operand_text(line: str, start: int) -> str:
  """The text of the operand list whose '(' is at line[start - 1]."""
  depth = 1
  for i in range(start, len(line)):
    if line[i] == "(":
      depth += 1
    elif line[i] == ")":
      depth -= 1
      if depth == 0:
        return line[start:i]
  return line[start:]


def parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  operands = tuple(re.findall(r"%([\w.\-]+)", _operand_text(line, m.end())))
  return Instr(m.group(1), m.group(2), m.group(3), operands, line)


def dims(shape_text: str) -> list[int]:
  """The dims of the first array in a type's text."""
  m = _ARRAY.search(shape_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def arrays(shape_text: str) -> list[tuple[str, list[int]]]:
  """(dtype, dims) of every array in a type's text (a tuple type has several)."""
  return [(dtype, [int(d) for d in ds.split(",") if d])
          for dtype, ds in _ARRAY.findall(shape_text)]


def array_bytes(shape_text: str) -> list[float]:
  out = []
  for dtype, ds in _ARRAY.findall(shape_text):
    if dtype in _ITEMSIZE:
      out.append(math.prod(int(d) for d in ds.split(",") if d) * _ITEMSIZE[dtype])
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


def _trip_from_condition(lines) -> int | None:
  """A scan's loop condition is `i < N` with one integer constant N (the TPU compiler
  does not annotate known_trip_count); None when the condition is anything else."""
  consts = {int(c) for line in lines for c in _INT_CONST.findall(line)}
  is_lt = any("direction=LT" in line for line in lines)
  return consts.pop() if is_lt and len(consts) == 1 else None


@dataclasses.dataclass(frozen=True)
class Hlo:
  """Compiled HLO text read once: its computations ({name: [Instr]}), the entry, every
  instruction's result type by name, how many times each computation runs per step
  (mult: the product of the trip counts of the loops around it; data-dependent loops
  count once) and the trip counts seen."""
  comps: dict
  entry: str | None
  shapes: dict
  mult: dict
  trips: list
  dynamic_loops: list      # op_names of loops whose count is data-dependent


def while_trip(instr: Instr, comps: dict) -> int | None:
  m = _TRIP.search(instr.line)
  if m:
    return int(m.group(1))
  cond = instr.attr("condition")
  return _trip_from_condition([i.line for i in comps.get(cond.lstrip("%"), [])]) if cond \
      else None


def read_hlo(hlo: str) -> Hlo:
  raw, entry = _computations(hlo)
  comps = {name: [i for i in map(parse_instr, lines) if i] for name, lines in raw.items()}
  shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
  trips, dynamic = [], []
  for instrs in comps.values():
    for instr in instrs:
      if instr.op == "while":
        t = while_trip(instr, comps)
        if t is None:
          dynamic.append(instr.op_name)
        trips.append(1 if t is None else t)
  h = Hlo(comps, entry, shapes, {}, trips, dynamic)
  h.mult.update(multiplicities(h))
  return h


def multiplicities(hlo: Hlo, overflow_rounds: float | None = None) -> dict:
  """{computation: runs per step}: the product of the trip counts of the while loops
  around it (a data-dependent loop once; with overflow_rounds, the overflow-rounds loops
  that many times)."""
  edges = {name: [] for name in hlo.comps}
  for name, instrs in hlo.comps.items():
    for instr in instrs:
      trip = 1
      if instr.op == "while":
        t = while_trip(instr, hlo.comps)
        if overflow_rounds is not None and OVERFLOW_LOOP in instr.op_name:
          t = overflow_rounds
        trip = 1 if t is None else t
      for one, many in _CALLEES.findall(instr.line):
        for callee in (one or many).split(","):
          callee = callee.strip().lstrip("%")
          if callee in hlo.comps:
            edges[name].append((callee, trip))
  mult = {}

  def visit(name, factor):
    if name in mult and mult[name] >= factor:
      return
    mult[name] = factor
    for callee, trip in edges[name]:
      visit(callee, factor * trip)
  if hlo.entry is not None:
    visit(hlo.entry, 1)
  return mult


def collective_bytes(hlo: Hlo, overflow_rounds: float | None = None) -> dict[str, float]:
  """Bytes per chip per step of each collective kind: the result buffer of each op
  (reduce-scatter: its operand), times the loop trip counts around it (the overflow
  rounds' loops at overflow_rounds when given, else once). Async pairs are counted at
  their -start op (whose result tuple also carries the operands: the larger half is
  taken as the result)."""
  totals = {k: 0.0 for k in COLLECTIVES}
  mult = hlo.mult if overflow_rounds is None else multiplicities(hlo, overflow_rounds)
  for name, instrs in hlo.comps.items():
    factor = mult.get(name, 0)
    if not factor:
      continue
    for instr in instrs:
      kind = instr.op[:-len("-start")] if instr.op.endswith("-start") else instr.op
      if kind not in totals:
        continue
      sizes = array_bytes(instr.shape)
      if kind == "reduce-scatter" and instr.operands:
        sizes = array_bytes(hlo.shapes.get(instr.operands[0], "")) or sizes
      elif kind == "ragged-all-to-all" and instr.operands:
        # What moves is at most the smaller of the send buffer and the receive buffer
        # (out: the assignments; back: into a buffer of the assignments' size).
        sizes = [min(sum(array_bytes(hlo.shapes.get(instr.operands[0], ""))),
                     sum(sizes))]
      elif instr.op.endswith("-start") and len(sizes) > 1:
        sizes = sorted(sizes)[len(sizes) // 2:] if kind == "all-gather" else [max(sizes)]
      totals[kind] += factor * sum(sizes)
  return totals


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


# Mosaic kernels (tpu_custom_call) ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
  """What a Mosaic kernel's body says: its grid (None: a dynamic dimension), the block
  shapes of its operands, and the FLOPs of one grid step (its largest matmul)."""
  grid: tuple
  windows: tuple
  step_flops: float


@functools.lru_cache(maxsize=None)
def decode_kernel(body_b64: str) -> Kernel:
  raw = base64.b64decode(body_b64)
  try:
    text = raw.decode()
  except UnicodeDecodeError:  # MLIR bytecode (Pallas calls)
    from jax._src.lib import tpu
    from jax._src.lib.mlir import ir
    ctx = ir.Context()
    ctx.allow_unregistered_dialects = True
    tpu.register_dialect(ctx)
    with ctx:
      text = str(ir.Module.parse(raw))
  m = re.search(r"iteration_bounds = array<i64:([^>]*)>", text)
  grid = tuple(None if int(v) < 0 else int(v) for v in m.group(1).split(",")) if m else ()
  windows = tuple(tuple(int(v) for v in w.split(","))
                  for w in re.findall(r"window_bounds = array<i64:([^>]*)>", text))
  step = 0.0
  # `tpu.matmul %a, %b, %acc {...} : vector<..>, vector<..>, vector<..> -> vector<..>`
  # (text) or `"tpu.matmul"(%a, %b, %acc) {...} : (vector<..>, ...) -> vector<..>`
  for types in re.findall(r"tpu\.matmul[^\n]*\}\s*:\s*\(?([^\n]*?)\)?\s*->", text):
    vecs = [math.prod(int(d) for d in v.split("x")[:-1])
            for v in re.findall(r"vector<([^>]*)>", types)]
    if len(vecs) >= 3 and vecs[2]:
      lhs, rhs, out = vecs[:3]
      step = max(step, 2.0 * out * math.sqrt(lhs * rhs / out))   # 2 x out x contracted
  return Kernel(grid, windows, step)


def grouped_tiles(instr: Instr, kernel: Kernel, live_rows: float | None) -> tuple:
  """(tiles visited, tiles at most) of a grouped-matmul kernel's dynamic grid dimension:
  its metadata operands give G (group offsets, s32[G + 1]) and T = m tiles + G - 1
  (group ids and tile ids, s32[T] each); the m tile is the first block's first dim.
  `live_rows` rows in G equal, consecutive groups touch sum_g ceil(end_g / tm) -
  floor(start_g / tm) tiles; None: all T."""
  constraints = instr.attr("operand_layout_constraints") or ""
  ints = [int(n) for n in re.findall(r"s32\[(\d+)\]", constraints)]
  arrays = [n for n in ints if n > 1]
  if len(arrays) < 3 or not kernel.windows:
    return None, None
  G, T = arrays[0] - 1, arrays[1]
  if live_rows is None:
    return T, T
  tm = kernel.windows[0][0]
  tiles_m = T - G + 1
  rows = min(live_rows, tiles_m * tm)
  visited = 0
  for g in range(G):
    start, end = rows * g / G, rows * (g + 1) / G
    if end > start:
      visited += math.ceil(end / tm - 1e-9) - math.floor(start / tm)
  return min(visited, T), T


# The walk ---------------------------------------------------------------------------

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


def executed_work(hlo: Hlo, live_rows: float | None = None, overflow_rounds: float = 0.0,
                  attention_live: float = 1.0) -> Work:
  """What one chip executes per step (see the module docstring). live_rows: rows a
  routed grouped-matmul buffer holds (None: count its whole grid); overflow_rounds:
  trips of the overflow-rounds loops; attention_live: the fraction of an attention
  conditional's heavy branch that runs (the causal tiles)."""
  flops = collections.Counter()
  kernels, notes = [], []
  hbm = [0.0]
  hbm_by = collections.Counter()
  dynamic_seen = set()

  def branch_weights(instr: Instr, branches, inherited: str = "") -> list[float]:
    costs = [sum(comp_flops(b, inherited).values()) for b in branches]
    heavy = max(range(len(branches)), key=costs.__getitem__)
    attn = "/attn" in (instr.op_name or inherited)
    live = attention_live if attn else 1.0
    return [live if i == heavy else (1.0 - live if attn else 0.0)
            for i in range(len(branches))]

  @functools.lru_cache(maxsize=None)
  def comp_flops(name: str, inherited: str = "") -> collections.Counter:
    """FLOPs of one run of a computation, by class (trips inside included). inherited:
    the op_name of the op that called it (a fusion's products often carry none)."""
    out = collections.Counter()
    instrs = hlo.comps.get(name, [])
    # XLA's ragged-dot transpose (the weight gradient) is a product of per-group masked
    # operands in a fusion with an `output_mask` parameter and no op_name.
    masked = any(i.op == "parameter" and i.name.startswith("output_mask") for i in instrs)
    for instr in instrs:
      op_name = instr.op_name or ("ragged_dot_transpose/moe/" if masked else inherited)
      for cls, v in instr_flops(instr, op_name).items():
        out[cls] += v
    return out

  def instr_flops(instr: Instr, op_name: str) -> collections.Counter:
    out = collections.Counter()
    if instr.op == "convolution":
      out[flop_class(op_name)] += conv_flops(instr, hlo.shapes)
    elif instr.op == "dot":
      out[flop_class(op_name)] += dot_flops(instr, hlo.shapes)
    elif instr.op == "custom-call" and '"body":"' in instr.line:
      body = re.search(r'"body":"([^"]+)"', instr.line).group(1)
      k = decode_kernel(body)
      static = math.prod(g for g in k.grid if g is not None) if k.grid else 1
      steps = static
      cls = flop_class(op_name, kernel=True)
      if k.step_flops and None in k.grid:
        routed = cls.startswith("routed_experts")
        visited, at_most = grouped_tiles(instr, k, live_rows if routed else None)
        if visited is None:
          visited = at_most = 1
          notes.append(f"kernel {instr.name}: dynamic grid without group metadata, "
                       "counted as one step per static grid point")
        steps = static * visited
        kernels.append((instr.name, cls, steps * k.step_flops, static * at_most
                        * k.step_flops))
      out[cls] += steps * k.step_flops
    elif instr.op == "while":
      body = (instr.attr("body") or "").lstrip("%")
      if OVERFLOW_LOOP in op_name:
        trip = overflow_rounds
      else:
        trip = while_trip(instr, hlo.comps)
        if trip is None:
          dynamic_seen.add(op_name or instr.name)
          trip = 1
      for cls, v in comp_flops(body, op_name).items():
        out[cls] += trip * v
    elif instr.op == "conditional":
      branches = [b.strip().lstrip("%") for b in
                  (instr.attr("branch_computations") or "").strip("{}").split(",") if b]
      for b, w in zip(branches, branch_weights(instr, branches, op_name)):
        for cls, v in comp_flops(b, op_name).items():
          out[cls] += w * v
    elif instr.op in ("fusion", "call", "call-start", "async-start", "custom-call"):
      callee = instr.attr("calls") or instr.attr("to_apply")
      if callee:
        for cls, v in comp_flops(callee.lstrip("%"), op_name).items():
          out[cls] += v
    return out

  def walk_bytes(name: str, factor: float):
    """HBM bytes of the top-level ops of a computation and what it calls (not fusions'
    insides), times `factor` runs."""
    for instr in hlo.comps.get(name, []):
      if instr.op == "while":
        body = (instr.attr("body") or "").lstrip("%")
        trip = overflow_rounds if OVERFLOW_LOOP in instr.op_name else (
            while_trip(instr, hlo.comps) or 1)
        walk_bytes(body, factor * trip)
      elif instr.op == "conditional":
        branches = [b.strip().lstrip("%") for b in
                    (instr.attr("branch_computations") or "").strip("{}").split(",") if b]
        for b, w in zip(branches, branch_weights(instr, branches, instr.op_name)):
          walk_bytes(b, factor * w)
      elif instr.op in ("call", "call-start", "async-start"):
        callee = (instr.attr("calls") or instr.attr("to_apply") or "").lstrip("%")
        walk_bytes(callee, factor)
      else:
        if instr.op == "fusion":
          b = _fusion_bytes(instr, hlo)
        elif instr.op == "dynamic-slice":
          b = 2 * sum(array_bytes(instr.shape))
        elif instr.op == "dynamic-update-slice":
          b = 2 * sum(array_bytes(hlo.shapes.get(instr.operands[1], "")))
        elif instr.op not in _NO_TRAFFIC:
          b = sum(array_bytes(instr.shape)) + sum(
              sum(array_bytes(hlo.shapes.get(o, ""))) for o in instr.operands)
        else:
          b = 0.0
        hbm[0] += factor * b
        if b:
          hbm_by[f"{instr.op}:{instr.name}"] += factor * b

  if hlo.entry is not None:
    flops = comp_flops(hlo.entry)
    walk_bytes(hlo.entry, 1.0)
  if dynamic_seen:
    notes.append("loops with a data-dependent trip count, counted once: "
                 + "; ".join(sorted(dynamic_seen))[:500])
  return Work(collections.Counter(flops), hbm[0], hbm_by, kernels, notes)
