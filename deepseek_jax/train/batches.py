"""Training batches from token streams: a stream (or a weighted mixture of them) packed
into rows with segment ids, and a deterministic, checkpointable batch order.

The token stream (train or validation; data/corpus.py opens them) is cut into rows of
seq_len + 1 tokens; segment ids number the documents inside a row (0 is padding, never
produced here) and positions restart at each document. The row order of epoch e is a
permutation drawn from (seed, e), so the batch at step s is a pure function of
(seed, s): the iterator's whole state is the step, saved with every checkpoint, and each
process reads only its own rows of the global batch from the memory-mapped shards.
"""

from __future__ import annotations

import functools
import math
import sys

import numpy as np

from deepseek_jax.data import shards

COMPOSITIONS = ("mixed", "single_domain")   # how a batch's micro-batches draw on sources


def packed_rows(streams, weights, seq_len: int, seed: int, shuffle: bool = True):
  """PackedRows of one stream, or a Mixture of several."""
  rows = [PackedRows(s, seq_len=seq_len) for s in streams]
  return rows[0] if len(rows) == 1 else Mixture(rows, weights, seed, shuffle)


class PackedRows:
  """Rows of seq_len + 1 tokens cut from a stream, with segment ids and positions.

  stream: a shards.TokenStream (memory-mapped shards), or a token array with `starts`
  (the offset of each document in it)."""

  def __init__(self, stream, starts=None, seq_len: int = None):
    if not isinstance(stream, shards.TokenStream):
      stream = shards.ArrayStream(np.asarray(stream), np.asarray(starts, np.int64))
    self.stream = stream
    self.width = seq_len + 1
    self.n_rows = len(stream) // self.width
    if self.n_rows == 0:
      raise ValueError(f"the stream has {len(stream)} tokens: not one row of {self.width}")

  def rows(self, idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx)
    offsets = idx[:, None] * self.width + np.arange(self.width)
    docs = self.stream.doc_ids(offsets)
    # Segment ids 1..n inside each row; positions restart where the document changes.
    change = np.concatenate([np.ones_like(docs[:, :1], bool), docs[:, 1:] != docs[:, :-1]], 1)
    segments = np.cumsum(change, axis=1).astype(np.int32)
    start = np.maximum.accumulate(np.where(change, np.arange(self.width), 0), axis=1)
    positions = (np.arange(self.width) - start).astype(np.int32)
    tokens = np.stack([self.stream.read(int(r) * self.width, (int(r) + 1) * self.width)
                       for r in idx]) if len(idx) else np.zeros((0, self.width), np.int32)
    return {"tokens": tokens.astype(np.int32), "segments": segments,
            "positions": positions}


class Mixture:
  """Rows of several sources (PackedRows of one width) interleaved by weight: the row at
  stream position p is a pure function of (seed, p).

  Positions come in blocks of BLOCK rows; in every block source k holds exactly n_k rows
  (BLOCK * w_k rounded by largest remainder), in an order drawn from (seed, block). Its
  r-th row overall is row r mod N_k of its own permutation for epoch r // N_k (drawn from
  (seed, k, epoch)), so each source runs through its own epochs at its own pace and its
  position in the mixture (`locate`) is reproducible. shuffle=False (validation): blocks
  and sources in order.
  """

  BLOCK = 1024

  def __init__(self, sources, weights, seed: int, shuffle: bool = True):
    weights = np.asarray(weights, np.float64)
    if len(sources) != len(weights) or (weights <= 0).any():
      raise ValueError(f"data.paths: mixture weights must be > 0; got {weights.tolist()}")
    if len({r.width for r in sources}) != 1:
      raise ValueError("mixture sources must have one row width")
    share = weights / weights.sum() * self.BLOCK
    counts = np.floor(share).astype(np.int64)
    for k in np.argsort(-(share - counts), kind="stable")[:self.BLOCK - counts.sum()]:
      counts[k] += 1
    if (counts == 0).any():
      raise ValueError(f"data.paths: a weight below 1/{self.BLOCK} of the total: "
                       f"{weights.tolist()}")
    self.sources, self.counts, self.seed, self.shuffle = sources, counts, seed, shuffle
    self.weights = weights / weights.sum()
    self.width = sources[0].width
    # Validation (no shuffle): the positions before a source would repeat a row.
    # Training: the sources' rows together (sources wrap around at their own pace).
    self.n_rows = (int(min(r.n_rows // c for r, c in zip(sources, counts)) * self.BLOCK)
                   if not shuffle else sum(r.n_rows for r in sources))
    # Memos shared by the loader's threads (functools.lru_cache is thread-safe): the
    # blocks around the current position, each source's current and next epoch.
    self._block = functools.lru_cache(64)(self._new_block)
    self._permutation = functools.lru_cache(4 * len(sources))(self._new_permutation)

  def _new_block(self, b: int):
    """(source of each slot, rank of the slot among its source's slots) of block b."""
    slots = np.repeat(np.arange(len(self.counts)), self.counts)
    if self.shuffle:
      slots = np.random.default_rng([self.seed, 1 << 30, b]).permutation(slots)
    rank = np.zeros(self.BLOCK, np.int64)
    for k in range(len(self.counts)):
      rank[slots == k] = np.arange(self.counts[k])
    return slots, rank

  def _new_permutation(self, k: int, epoch: int):
    n = self.sources[k].n_rows
    return (np.random.default_rng([self.seed, k, epoch]).permutation(n) if self.shuffle
            else np.arange(n))

  def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
    """(source, position within the source's own stream of rows) of each position."""
    positions = np.asarray(positions, np.int64)
    src = np.empty(positions.shape, np.int64)
    pos = np.empty(positions.shape, np.int64)
    for i, p in enumerate(positions.reshape(-1)):
      b, j = divmod(int(p), self.BLOCK)
      slots, rank = self._block(b)
      src.reshape(-1)[i] = slots[j]
      pos.reshape(-1)[i] = b * self.counts[slots[j]] + rank[j]
    return src, pos

  def rows(self, positions) -> dict[str, np.ndarray]:
    return self.source_rows(*self.locate(positions))

  def single_domain_rows(self, step: int, batch: int, microbatches: int, lo: int, hi: int):
    """Rows lo..hi-1 of step `step`'s batch composed one source a micro-batch: row i
    belongs to micro-batch i mod M (train/step.py's strided split), global micro-batch
    j = step M + i mod M reads source j mod K, each source running through its own
    stream (micro-batch j // K of it) at its own pace: domains rotate over
    micro-batches and steps, and the batch is a pure function of (seed, step)."""
    M, K = microbatches, len(self.sources)
    i = np.arange(lo, hi, dtype=np.int64)
    j = step * M + i % M
    return self.source_rows(j % K, (j // K) * (batch // M) + i // M)

  def source_rows(self, src, pos) -> dict[str, np.ndarray]:
    """The rows at positions `pos` of the sources `src` (each its own epochs)."""
    src, pos = np.asarray(src), np.asarray(pos)
    parts, order = [], []
    for k in np.unique(src):
      sel = np.flatnonzero(src == k)
      n = self.sources[k].n_rows
      idx = [self._permutation(int(k), int(q) // n)[int(q) % n] for q in pos[sel]]
      parts.append(self.sources[k].rows(np.asarray(idx, np.int64)))
      order.append(sel)
    order = np.argsort(np.concatenate(order), kind="stable")
    return {key: np.concatenate([p[key] for p in parts])[order] for key in parts[0]}


class BatchSchedule:
  """The batch of step s: rows of an endless stream of per-epoch permutations, from the
  stream position of step s on: deterministic and stateless, a pure function of
  (seed, step) whatever the process count.

  One batch size B: step s takes positions [s B, (s + 1) B), an epoch being the first
  floor(n_rows / B) B rows of its permutation (the rest of the epoch's rows skipped).
  Batch-size stages (recipe.Recipe.stages, a ramp): step s of a stage that starts at
  step s0 and stream position p0 takes B_stage rows from p0 + (s - s0) B_stage on; an
  epoch is then floor(n_rows / G) G rows with G the gcd of the stage sizes (G = B with
  one stage: the rule above), and a batch may run from one epoch into the next.
  """

  def __init__(self, rows: PackedRows, batch_size: int, seed: int, stages=None,
               composition: str = "mixed", microbatches: int = 1):
    """stages: [(start_step, batch)] in step order, the first at step 0 (None: one
    stage of batch_size). composition "single_domain" (a Mixture, one stage): each
    micro-batch of `microbatches` from one source (Mixture.single_domain_rows); "mixed":
    the sources shuffled together."""
    stages = [(0, batch_size)] if stages is None else [(int(a), int(b)) for a, b in stages]
    if stages[0][0] != 0:
      raise ValueError("batch stages must start at step 0")
    if composition not in COMPOSITIONS:
      raise ValueError(f"data.composition must be one of {COMPOSITIONS}; got "
                       f"{composition!r}")
    if composition == "single_domain":
      if not isinstance(rows, Mixture):
        raise ValueError("data.composition='single_domain' needs several sources (a "
                         "mixture, e.g. data.source='domains')")
      if len(stages) > 1 or microbatches < 1 or batch_size % microbatches:
        raise ValueError(f"data.composition='single_domain' needs one batch size divisible "
                         f"by an explicit microbatches (batch_size={batch_size}, "
                         f"microbatches={microbatches}, {len(stages)} batch stage(s))")
    self.composition, self.microbatches = composition, microbatches
    biggest = max(b for _, b in stages)
    if rows.n_rows < biggest:
      raise ValueError(f"{rows.n_rows} rows cannot fill a batch of {biggest}")
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    gcd = math.gcd(*[b for _, b in stages])
    self.epoch_rows = rows.n_rows // gcd * gcd   # (unused for a Mixture)
    # (start step, stream position, batch) of every stage.
    self.stages, pos = [], 0
    for i, (start, batch) in enumerate(stages):
      if i:
        prev_start, prev_pos, prev_batch = self.stages[-1]
        pos = prev_pos + (start - prev_start) * prev_batch
      self.stages.append((start, pos, batch))
    # A thread-safe memo of the current and neighbouring epochs' permutations.
    self._permutation = functools.lru_cache(3)(self._new_permutation)

  def _new_permutation(self, epoch):
    return np.random.default_rng([self.seed, epoch]).permutation(self.rows.n_rows)

  def batch_size_at(self, step: int) -> int:
    return [b for start, _, b in self.stages if start <= step][-1]

  def global_indices(self, step: int) -> np.ndarray:
    start, pos, batch = [st for st in self.stages if st[0] <= step][-1]
    first = pos + (step - start) * batch
    if isinstance(self.rows, Mixture):   # the mixture orders its own rows
      return np.arange(first, first + batch)
    epoch, i = divmod(first, self.epoch_rows)
    head = self._permutation(epoch)[i:min(i + batch, self.epoch_rows)]
    if len(head) == batch:
      return head
    return np.concatenate([head, self._permutation(epoch + 1)[:batch - len(head)]])

  def batch(self, step: int, process_index: int = 0, process_count: int = 1):
    """This process's contiguous slice of the global batch of `step`."""
    if self.composition == "single_domain":
      per = self.batch_size // process_count
      return self.rows.single_domain_rows(step, self.batch_size, self.microbatches,
                                          process_index * per, (process_index + 1) * per)
    idx = self.global_indices(step)
    per = len(idx) // process_count
    return self.rows.rows(idx[process_index * per:(process_index + 1) * per])


class Prefetcher:
  """batch(step) for steps taken in order, built ahead by a Grain iterator.

  `make(step)` (BatchSchedule.batch with this process's slice) is a pure function of
  the step, so the loader is Grain's `MapDataset.range(stop).map(make)` read through
  its thread-prefetching iterator (`ReadOptions(num_threads=threads,
  prefetch_buffer_size=depth)`): `get(s)` returns make(s) while steps s + 1 .. s + depth
  are read on the threads (numpy's gathers and the memory-mapped reads release the
  GIL). The iterator's state is its next index, i.e. the step, so a get() out of order
  (a resume, a jump back) moves it there (`set_state`) and nothing else is saved.
  depth 0: built in the caller, nothing in the background (the reference path)."""

  def __init__(self, make, depth: int = 2, threads: int = 1, stop: int | None = None):
    """stop: the first step never asked for (the run's total): nothing is built past it."""
    if depth < 0 or threads < 1:
      raise ValueError(f"prefetch depth must be >= 0 and threads >= 1; got {depth}, "
                       f"{threads}")
    self.make, self.it = make, None
    if depth:
      import grain
      steps = grain.MapDataset.range(sys.maxsize if stop is None else stop).map(make)
      self.it = iter(steps.to_iter_dataset(
          grain.ReadOptions(num_threads=threads, prefetch_buffer_size=depth)))

  def get(self, step: int):
    if self.it is None:
      return self.make(step)
    if self.it.get_state()["next_index"] != step:
      self.it.set_state({"next_index": step})   # cancels what was read ahead
    return next(self.it)

  def close(self):
    if self.it is not None:
      self.it.close()
      self.it = None


def validation_batches(rows: PackedRows, batch_size: int, n_batches: int | None,
                       process_index: int = 0, process_count: int = 1):
  """The fixed validation batches, in order (all full batches when n_batches is None)."""
  total = rows.n_rows // batch_size
  n = total if n_batches is None else min(n_batches, total)
  per = batch_size // process_count
  for b in range(n):
    start = b * batch_size + process_index * per
    yield rows.rows(np.arange(start, start + per))

