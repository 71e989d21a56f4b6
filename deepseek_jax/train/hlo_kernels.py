"""Mosaic kernels (tpu_custom_call) decoded: what a Pallas call or XLA's ragged-dot kernel
executes.

A kernel's body (base64 MLIR, text or bytecode) gives its grid, the block shapes of its
operands and the matmul of one grid step: FLOPs = grid steps x that matmul. A
grouped-matmul kernel's grid has one dynamic dimension, the tiles of rows that hold a
group (its metadata operands: group offsets [G + 1], group ids and tile ids
[T = m tiles + G - 1]); it is counted at the tiles `live_rows` rows in G equal groups
touch, not at its static buffer.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math
import re

from deepseek_jax.train.hlo import Instr


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
