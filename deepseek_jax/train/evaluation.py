"""Evaluate a run's checkpoint on any prepared dataset: loss, perplexity, bits per byte.

Bits per byte make runs with different tokenizers comparable: the summed cross-entropy
(nats) over the evaluated targets, divided by ln 2 and by the UTF-8 bytes of text those
targets cover. The bytes are estimated from the split's own ratio (manifest: text bytes
/ tokens of the split), since a row of tokens does not map to whole documents.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from deepseek_jax.data import corpus as corpus_lib
from deepseek_jax.data import shards
from deepseek_jax.train import batches as batches_lib


def restore_state(workdir: str, step: int | None = None):
  """(model, TrainState, run config, step, checkpoint meta) of a run, on one device."""
  import ml_collections
  from deepseek_jax.model.config import model_config_from
  from deepseek_jax.model.transformer import Transformer
  from deepseek_jax.train.checkpoint import CONFIG_FILE, Checkpointer
  from deepseek_jax.train.step import init_state, make_optimizer, run_lr_schedule

  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir} holds no run ({CONFIG_FILE} missing)")
  with open(path) as fh:
    run_cfg = ml_collections.ConfigDict(json.load(fh))
  model = Transformer(model_config_from(run_cfg.model))
  tx = make_optimizer(run_cfg.optimizer, run_cfg.total_steps, run_lr_schedule(run_cfg))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
      jax.eval_shape(lambda: init_state(model, tx, jax.random.PRNGKey(0))))
  ckpt = Checkpointer(workdir, keep=run_cfg.keep_checkpoints, async_save=False)
  try:
    restored = (ckpt.restore_latest(abstract) if step is None
                else ckpt.restore_step(step, abstract))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir} holds a run config but no checkpoint that "
                            f"restores in {ckpt.directory}: train it first (rerun "
                            f"`experiments.train` with this --workdir)")
  state, meta, step = restored
  return model, state, run_cfg, step, meta


def evaluate_prepared(workdir: str, dirs: list[str], batches: int | None = None,
                      step: int | None = None, split: str = "val",
                      batch_size: int | None = None) -> dict:
  """Loss, perplexity and bits per byte of a run's checkpoint on each prepared dataset
  (its validation split by default); batches=None: every full batch."""
  from deepseek_jax.train.step import eval_step
  model, state, run_cfg, step, meta = restore_state(workdir, step)
  fn = jax.jit(lambda st, b: eval_step(st, b, model=model, cfg=run_cfg))
  batch_size = batch_size or run_cfg.batch_size
  results = {"workdir": workdir, "step": step, "split": split, "sources": []}
  for directory in dirs:
    try:   # the tokenizer first: the most specific reason a dataset does not fit
      tokenizer = shards.read_manifest(directory)["tokenizer"]
    except shards.PreparedDataError as e:
      raise ValueError(str(e)) from None
    saved = meta.get("tokenizer")
    if saved is not None and saved != tokenizer:
      raise ValueError(f"{directory} was prepared with another tokenizer ({tokenizer}) "
                       f"than the run trained with ({saved}); prepare it with the run's "
                       "tokenizer (its tokenizer.json, or bytes)")
    manifest = corpus_lib.open_prepared(directory, model.cfg.vocab_size)
    stream = shards.TokenStream(directory, manifest, split)
    rows = batches_lib.PackedRows(stream, seq_len=run_cfg.seq_len) if len(stream) else None
    if rows is None or rows.n_rows < batch_size:
      raise ValueError(f"{directory}: the {split} split holds "
                       f"{0 if rows is None else rows.n_rows} rows of {run_cfg.seq_len + 1} "
                       f"tokens, fewer than one batch of {batch_size}; use --split=train "
                       "or --batch_size")
    ce, n = 0.0, 0.0
    for local in batches_lib.validation_batches(rows, batch_size, batches):
      out = jax.device_get(fn(state, {k: jax.numpy.asarray(v) for k, v in local.items()}))
      ce += float(np.sum(out["ce_sum"]))
      n += float(np.sum(out["n_tokens"]))
    info = manifest["totals"][split]
    bytes_per_token = info["text_bytes"] / max(info["tokens"], 1)
    loss = ce / max(n, 1.0)
    results["sources"].append({
        "data": directory, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
        "bits_per_byte": ce / math.log(2) / max(n * bytes_per_token, 1e-9),
        "tokens": int(n), "bytes_per_token": bytes_per_token})
  return results
