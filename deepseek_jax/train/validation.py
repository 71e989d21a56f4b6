"""Validation while training: fixed batches of the held-out split through the eval step,
reduced to loss, perplexity, MTP loss per depth and MaxVio_global."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from deepseek_jax import balancing
from deepseek_jax.train import batches as batches_lib, multihost


def global_batch(local, batch_sh):
  """A process's rows of a batch as one global array per field."""
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}


# Evaluation steps allowed in flight between host syncs: hundreds of queued cross-process
# collectives deadlocked Gloo (docs/design.md, "Multi-host"); a sync also asks whether to
# stop for a preemption.
EVAL_SYNC_EVERY = 8


@functools.partial(jax.jit, donate_argnums=0)
def _sum_batches(acc, out):
  return jax.tree.map(jnp.add, acc, out)


@jax.jit
def _sum_sequences(acc):
  return jax.tree.map(lambda a: a.sum(0), acc)


def evaluate(eval_fn, state, rows, cfg, batch_sh, n_batches, n_moe_layers,
             stop=lambda: False):
  """Validation over fixed batches: loss, perplexity, MTP loss per depth, MaxVio_global.

  The per-sequence sums of each batch (step.eval_step) are added on device, where each
  data shard keeps its own rows, and reduced over the batch once at the end: a batch
  costs no cross-process reduction. stop() is asked every EVAL_SYNC_EVERY batches (with
  every process's answer): True abandons the evaluation and returns None."""
  acc, t0 = None, time.perf_counter()
  batches = batches_lib.validation_batches(rows, cfg.batch_size, n_batches,
                                           jax.process_index(), jax.process_count())
  total = rows.n_rows // cfg.batch_size
  n = total if n_batches is None else min(n_batches, total)
  logging.info("evaluating %d batch(es) of %d x %d", n, cfg.batch_size, cfg.seq_len)
  for i, local in enumerate(batches):
    out = eval_fn(state, global_batch(local, batch_sh))
    acc = out if acc is None else _sum_batches(acc, out)
    if (i + 1) % EVAL_SYNC_EVERY == 0:
      jax.block_until_ready(acc)
      if multihost.any_process(stop()):
        return None
  sums = jax.device_get(_sum_sequences(acc))
  tokens = max(float(sums["n_tokens"]), 1.0)
  result = {"val_loss": float(sums["ce_sum"]) / tokens, "eval_batches": n,
            "eval_seconds": time.perf_counter() - t0}
  result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
  if "mtp_sum" in sums:
    result["val_mtp"] = (np.asarray(sums["mtp_sum"])
                         / np.maximum(np.asarray(sums["mtp_tokens"]), 1.0)).tolist()
  if "load" in sums:
    mv = np.asarray(jax.device_get(balancing.max_violation(sums["load"])))
    result["val_load"] = np.asarray(sums["load"]).tolist()
    result["maxvio_global"] = mv.tolist()
    result["maxvio_global_mean"] = float(mv[:n_moe_layers].mean())
  return result


