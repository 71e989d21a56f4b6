"""Hugging Face checkpoint folders (config.json + *.safetensors) <-> (model, variables):
loading with every tensor checked against the weight rules, and saving, sharded or not.

Only `safetensors` is needed, not torch: tensors are read as numpy (bf16 via ml_dtypes).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Sequence

import jax
import numpy as np
import flax.linen as nn
from absl import logging

try:
  from safetensors import safe_open
  from safetensors.numpy import save_file
except ImportError as e:  # the "parity" extra
  raise ImportError("deepseek_jax.hf needs safetensors: pip install -e '.[parity]'") from e

from deepseek_jax.hf.config import config_from_hf, config_to_hf
from deepseek_jax.hf.weights import (expected_leaves, flatten_leaves, unflatten_leaves,
                                     weight_rules)
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.transformer import Transformer, stack_layers, unstack_layers


def _name_list(names: Sequence[str], n: int = 8) -> str:
  names = sorted(names)
  return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _tensor_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the .safetensors file holding it (sharded index, or every file)."""
  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: path / f for name, f in weight_map.items()}
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{path}: no *.safetensors files")
  where = {}
  for f in files:
    with safe_open(f, framework="np") as h:
      for name in h.keys():
        if name in where:
          raise ValueError(f"{path}: tensor {name} is in both {where[name].name} and {f.name}")
        where[name] = f
  return where


def _mtp_depth(cfg: ModelConfig, names, mtp: bool | None) -> int:
  declared = cfg.mtp_depth
  present = any(n.startswith(f"model.layers.{cfg.n_layers + k}.")
                for k in range(declared) for n in names)
  if mtp is None:
    # HF's save_pretrained writes num_nextn_predict_layers (default 1) but not the layers.
    if declared and not present:
      logging.info("config declares %d MTP layer(s) but the checkpoint has none: "
                   "loading without MTP", declared)
    return declared if present else 0
  if mtp and not declared:
    raise ValueError("mtp=True but the config declares no MTP layers "
                     "(num_nextn_predict_layers)")
  return declared if mtp else 0


def load_checkpoint(path, dtype: str = "float32", *, mtp: bool | None = None, **overrides):
  """A HF DeepSeek-V3 folder (config.json + *.safetensors) -> (Transformer, variables).

  dtype: the param and compute dtype (router and balancing bias stay float32).
  mtp: None keeps the MTP modules when the checkpoint holds them; False drops them (their
  tensors are then ignored); True requires them. overrides: more ModelConfig fields
  (e.g. moe_dispatch). A missing, unused or misshapen tensor raises ValueError.
  """
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"no Hugging Face checkpoint in {path}: expected a folder with "
                            f"config.json and *.safetensors (e.g. a downloaded "
                            f"DeepSeek-V3 snapshot)")
  hf_config = json.loads((path / "config.json").read_text())
  where = _tensor_files(path)
  cfg = config_from_hf(hf_config)
  scan = bool(overrides.pop("scan_layers", False))   # HF's layout is the unrolled one
  depth = _mtp_depth(cfg, where, mtp)
  dropped = tuple(f"model.layers.{cfg.n_layers + k}." for k in range(depth, cfg.mtp_depth))
  cfg = cfg.replace(**{"mtp_depth": depth, "dtype": dtype, "param_dtype": dtype, **overrides})
  model = Transformer(cfg)
  expected = expected_leaves(model)
  rules = weight_rules(cfg, fused=lambda hf: hf + "mlp.experts.gate_up_proj" in where,
                 rope_interleave=hf_config.get("rope_interleave", True))

  used = {n for r in rules for n in r.hf}
  missing = [n for r in rules if not r.copy for n in r.hf if n not in where]
  unused = [n for n in where if n not in used and not n.startswith(dropped)]
  if missing:
    raise ValueError(f"{path}: missing tensor(s): {_name_list(missing)}")
  if unused:
    raise ValueError(f"{path}: tensor(s) not used by the model: {_name_list(unused)}")

  flat = {}
  with contextlib.ExitStack() as stack:
    handles = {}

    def read(name):
      f = where[name]
      if f not in handles:
        handles[f] = stack.enter_context(safe_open(f, framework="np"))
      return handles[f].get_tensor(name)

    # Originals first, so that the copies can be compared with them.
    for r in sorted(rules, key=lambda r: r.copy):
      if r.copy and not all(n in where for n in r.hf):
        continue
      dt = expected[r.ours[0]].dtype  # one dtype per rule (the router is a rule of its own)
      xs = [read(n).astype(dt, copy=False) for n in r.hf]
      want = jax.eval_shape(r.conversion.save, [expected[o] for o in r.ours])
      bad = [f"{n} {x.shape} (want {w.shape})" for n, x, w in zip(r.hf, xs, want)
             if tuple(x.shape) != tuple(w.shape)]
      if bad:
        raise ValueError(f"{path}: wrong shape: {_name_list(bad, 4)}")
      ys = [np.ascontiguousarray(y) for y in r.conversion.load(xs)]
      if any(y.shape != expected[o].shape for o, y in zip(r.ours, ys)):  # a table bug
        raise ValueError(f"mapping table mismatch: {r.hf} -> {[y.shape for y in ys]}, want "
                         f"{[expected[o].shape for o in r.ours]}")
      if r.copy:
        if not all(np.array_equal(y, flat[o]) for o, y in zip(r.ours, ys)):
          raise ValueError(f"{path}: {_name_list(r.hf)} should be a copy of the main model's "
                           f"{_name_list(r.ours)} but differs")
      else:
        flat.update(zip(r.ours, ys))

  if flat.keys() != expected.keys():  # a bug in the table, not in the checkpoint
    raise ValueError(f"mapping table mismatch: no tensor for "
                     f"{_name_list(expected.keys() - flat.keys())}; not in the model: "
                     f"{_name_list(flat.keys() - expected.keys())}")
  variables = unflatten_leaves(flat, cfg.n_routed_layers)
  if scan:
    cfg = cfg.replace(scan_layers=True)
    variables["params"] = stack_layers(variables["params"], cfg)
    model = Transformer(cfg)
  return model, variables


def save_checkpoint(path, cfg: ModelConfig, variables, fused_experts: bool = True,
                    max_shard_bytes: int | None = None) -> None:
  """Our variables -> a HF folder (config.json + safetensors), rope interleaved, MTP
  modules in the released layout (with their embedding and head copies).

  max_shard_bytes None: one model.safetensors. A number: shards of at most that many
  bytes (a tensor larger than it gets a shard of its own) named model-0000i-of-0000n
  .safetensors with model.safetensors.index.json, as transformers writes them. Tensors
  are converted rule by rule and each shard is written and dropped once full, so a
  large export holds one shard of HF tensors beside the model, not a second model."""
  if cfg.score_func != "sigmoid":
    logging.warning("scoring_func=%r: HF's DeepseekV3 ignores it (always sigmoid); "
                    "DeepSeek's own code reads it", cfg.score_func)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  variables = nn.unbox(variables)
  if cfg.scan_layers:   # HF's layout is the unrolled one
    variables = {**variables, "params": unstack_layers(variables["params"], cfg)}
    cfg = cfg.replace(scan_layers=False)
  flat = flatten_leaves(variables)
  rules = weight_rules(cfg, fused=lambda hf: fused_experts, rope_interleave=True)
  needed = {o for r in rules for o in r.ours}
  if needed != flat.keys():
    raise ValueError(f"variables do not match cfg: missing {_name_list(needed - flat.keys())}; "
                     f"unexpected {_name_list(flat.keys() - needed)}")
  shards, shard, shard_bytes, total = [], {}, 0, 0

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      name = f"model-part-{len(shards):05d}.safetensors"
      save_file(shard, path / name, metadata={"format": "pt"})
      shards.append((name, sorted(shard)))
    shard, shard_bytes = {}, 0

  for r in rules:
    if not r.write:
      continue
    arrays = r.conversion.save([np.asarray(flat[o]) for o in r.ours])
    for n, a in zip(r.hf, arrays):
      a = np.ascontiguousarray(a)
      if max_shard_bytes is not None and shard and shard_bytes + a.nbytes > max_shard_bytes:
        flush()
      shard[n] = a
      shard_bytes += a.nbytes
      total += a.nbytes
  flush()
  for old in set(path.glob("model*.safetensors")) - {path / n for n, _ in shards}:
    old.unlink()   # a previous export's files in the same folder
  index = path / "model.safetensors.index.json"
  if max_shard_bytes is None:
    (path / shards[0][0]).replace(path / "model.safetensors")
    index.unlink(missing_ok=True)
  else:
    weight_map = {}
    for i, (name, names) in enumerate(shards):
      final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      (path / name).replace(path / final)
      weight_map.update({n: final for n in names})
    index.write_text(json.dumps({"metadata": {"total_size": total},
                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2))
  (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
