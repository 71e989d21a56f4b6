"""The routed experts' rows and rounds in a compiled train step: what a grouped-matmul
buffer holds at balanced routing, a run's per-layer expert counts, and the ragged
exchange's rounds at those counts (train/aot_work.py counts the routed work at them).
"""

from __future__ import annotations

import math

from deepseek_jax.model.partitioning import BATCH


def routed_rows_per_buffer(cfg, model_cfg, mesh) -> float:
  """Rows a routed grouped-matmul buffer holds at balanced routing: the tokens one shard
  routes per microbatch (the batch over microbatches and over every axis that splits
  tokens: the batch axes, and "tensor" when it splits the MoE's sequence) times K; under
  expert parallelism each shard receives as many as it sends."""
  shards = math.prod(mesh.shape.get(a, 1) for a in BATCH)
  tensor = mesh.shape.get("tensor", 1)
  if tensor > 1 and cfg.seq_len % tensor == 0:
    shards *= tensor
  tokens = cfg.batch_size * cfg.seq_len / max(int(cfg.microbatches), 1) / shards
  return tokens * model_cfg.top_k


def read_routing_counts(path: str):
  """Per-layer expert counts [L, E] from a run's metrics.jsonl (its last record with the
  evaluation's "val_load") or a JSON file: a list of rows, or an object with "load" or
  "val_load"."""
  import json
  import numpy as np
  with open(path) as fh:
    text = fh.read()
  found = None
  try:
    found = json.loads(text)
  except json.JSONDecodeError:
    for line in text.splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and "val_load" in rec:
        found = rec
  if isinstance(found, dict):
    found = found.get("val_load", found.get("load"))
  counts = np.asarray(found if found is not None else [], dtype=np.float64)
  if counts.ndim != 2 or counts.size == 0:
    raise ValueError(f"--routing_counts={path}: no per-layer expert counts found (a "
                     "metrics.jsonl with an evaluation's val_load, or JSON [[count per "
                     "expert] per layer])")
  return counts


def routing_rounds(counts_LE, cfg, model_cfg, mesh) -> dict:
  """What a routing with these per-layer expert loads costs the ragged exchange on this
  mesh, from expected loads (each microbatch routing like the whole count): the hottest
  expert-axis shard of layer l receives h_l = Z x its share of the assignments times
  the balanced X K rows, so it runs ceil(h_l X K / buffer) rounds (every shard runs the
  layer's maximum), its grouped matmuls hold min(h_l X K, buffer) rows a round."""
  import numpy as np
  from deepseek_jax.model import ragged_exchange
  E, Z = model_cfg.n_routed_experts, mesh.shape.get("expert", 1)
  if counts_LE.shape[1] != E:
    raise ValueError(f"--routing_counts: {counts_LE.shape[1]} experts per layer, but the "
                     f"model has {E}: use counts of a run of this model")
  balanced = routed_rows_per_buffer(cfg, model_cfg, mesh)
  X = balanced / model_cfg.top_k
  cap = (ragged_exchange.receive_rows(int(round(X)), model_cfg, Z)
         if model_cfg.ep_exchange == "ragged" and Z > 1 else balanced)
  share_LZ = counts_LE.reshape(len(counts_LE), Z, E // Z).sum(-1)
  share_LZ = share_LZ / np.maximum(share_LZ.sum(-1, keepdims=True), 1e-30)
  hot_L = Z * share_LZ.max(-1)
  rows_L = hot_L * balanced
  rounds_L = np.maximum(1, np.ceil(rows_L / cap - 1e-9))
  return {"layers": len(counts_LE), "hot_shard_load": hot_L.round(4).tolist(),
          "rounds": rounds_L.astype(int).tolist(), "buffer_rows": int(cap),
          "balanced_rows": balanced,
          "mean_extra_rounds": float(np.mean(rounds_L - 1)),
          "mean_first_round_rows": float(np.mean(np.minimum(rows_L, cap)))}
