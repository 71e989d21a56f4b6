"""Collective accounting: the bytes one chip moves per step in each collective kind.

Read from the compiled program (train/hlo.py): each collective's result buffer
(reduce-scatter: its operand; ragged all-to-all: the smaller of its send and receive
buffers), times the trips of the loops around it.
"""

from __future__ import annotations

from deepseek_jax.train.hlo import Hlo, array_bytes, multiplicities

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")


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
