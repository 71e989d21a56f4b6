"""Reading a compiled program's HLO text: its computations, instructions and loops.

The optimised HLO (`compiled.as_text()`, the per-chip SPMD program) read once into its
computations, each a list of instructions (name, result type, op, operands, attributes),
and how many times each computation runs per step:

  trips        every while loop's trip count: XLA's known_trip_count, else a scan's
               `i < N` condition; a loop whose count is data-dependent is counted once,
               except the expert-parallel overflow rounds (their while carries the name
               `OVERFLOW_LOOP`), counted at the extra rounds the caller gives (0 at
               balanced routing).

What a step executes is counted from this reading: FLOPs and HBM bytes in
train/hlo_work.py (Mosaic kernels decoded in train/hlo_kernels.py), collective bytes in
train/hlo_collectives.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

from deepseek_jax.model.ragged_exchange import OVERFLOW_SCOPE

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
