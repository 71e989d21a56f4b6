"""The largest batch that fits, found with few tries of an expensive predicate (a compile).

Batches are multiples of `step` (the request shards: every chip holds whole requests).
From a first guess: double while it fits, or halve while it does not, until one fitting
and one failing batch bracket the answer; then bisect the bracket down to one step.
With a guess within 2x of the answer that is 1 + log2(answer / step) tries or fewer
after the bracket; fits(b) is assumed monotone (fits at b => fits at every smaller b).
"""

from __future__ import annotations

from typing import Callable


def search(fits: Callable[[int], bool], guess: int, step: int,
           limit: int = 1 << 30) -> tuple[int, list[list]]:
  """(the largest multiple n of `step` with fits(n), or 0 when step itself does not fit;
  the trail [[batch, fits], ...] in the order tried). `limit` caps the doubling."""
  if step < 1 or guess < 1:
    raise ValueError(f"max_batch.search: step and guess must be >= 1; got {step}, {guess}")
  trail = []

  def tryit(b):
    ok = bool(fits(b))
    trail.append([b, ok])
    return ok

  b = max(step, guess // step * step)
  lo, hi = 0, None   # lo fits (0: none known), hi fails (None: none known)
  if tryit(b):
    lo = b
    while hi is None:
      if 2 * lo > limit:
        return lo, trail
      if tryit(2 * lo):
        lo *= 2
      else:
        hi = 2 * lo
  else:
    hi = b
    while lo == 0 and hi > step:
      b = max(step, hi // 2 // step * step)
      if tryit(b):
        lo = b
      else:
        hi = b
    if lo == 0:
      return 0, trail
  while hi - lo > step:
    mid = lo + (hi - lo) // 2 // step * step
    if tryit(mid):
      lo = mid
    else:
      hi = mid
  return lo, trail
