"""How fast the input pipeline delivers batches, against what the train step consumes.

The loader is the training loop's: batches.Prefetcher over batches.BatchSchedule over
memory-mapped prepared shards. Two rates, tokens per second as ready host batches:
- at the train bench's batch (8 x 256 on the bench model), to compare with the train
  part's train_tokens_per_s in the same run (goal: >= 20x, so input never stalls a step);
- at one TPU v5p host's share of the 671B batch on v5p-512 (15,360 sequences of 4,096 over
  128 hosts: 120 rows a step), against what that host must deliver at the step time
  experiments.compile estimates for v5p-512 (V5P_512_STEP_S; the margin: docs/design.md,
  "Prepared data").
"""

from __future__ import annotations

import time

import numpy as np

from deepseek_jax.data import corpus as corpus_lib
from deepseek_jax.train import batches as batches_lib

# experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8: the
# compute-bound step time estimate of the largest stage (docs/history.md, "Pod scale
# before the ragged exchange", remat policy).
V5P_512_STEP_S = 69.8
V3_BATCH, V3_SEQ, V5P_512_HOSTS = 15_360, 4_096, 128


def _rate(rows, batch: int, steps: int) -> float:
  """Ready batches per second through the training loop's loader (batches.Prefetcher with
  its default depth, one thread), consumed as fast as they come."""
  schedule = batches_lib.BatchSchedule(rows, batch, seed=0)
  loader = batches_lib.Prefetcher(schedule.batch)
  loader.get(0)                               # the first epoch's permutation
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    loader.get(s)
  took = time.perf_counter() - t0
  loader.close()
  return batch * rows.width * steps / took


def run(tiny: bool = False, train_tokens_per_s: float | None = None) -> dict:
  from configs import small, smoke
  cfg = smoke.get_config() if tiny else small.get_config()
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  out = {}
  batch, seq = (2, 32) if tiny else (8, 256)
  rows = batches_lib.packed_rows(corpus.train, corpus.weights, seq, seed=0)
  out["data_tokens_per_s"] = _rate(rows, batch, 20 if tiny else 200)
  if train_tokens_per_s:
    out["data_vs_train_tokens_ratio"] = out["data_tokens_per_s"] / train_tokens_per_s
  host_rows = V3_BATCH // V5P_512_HOSTS
  long_rows = batches_lib.packed_rows(corpus.train, corpus.weights,
                                      256 if tiny else V3_SEQ, 0)
  if long_rows.n_rows >= host_rows:
    out["data_v5p_host_tokens_per_s"] = _rate(long_rows, host_rows, 2 if tiny else 10)
    need = V3_BATCH * V3_SEQ / V5P_512_HOSTS / V5P_512_STEP_S
    out["data_v5p_host_needed_tokens_per_s"] = need
    out["data_v5p_host_margin"] = out["data_v5p_host_tokens_per_s"] / need
  out["data_train_tokens"] = int(np.sum([len(t) for t in corpus.train]))
  return out
