"""Hugging Face DeepSeek-V3 checkpoints (SPEC.md section 7) <-> our variables.

One table (`_rules`) drives both directions: each rule ties some HF tensors to some of our
leaves through a pair of inverse functions (`load`: HF -> ours, `save`: ours -> HF). HF
Linear weights are [out, in]; ours are [in, ...], split per head where MLA needs it.

Leaves are named by their path in the variables tree ("params/layer_1/attn/w_uq"); the
balancing bias [L, E] is named by rows ("balance/expert_bias/3"), one per routed layer
(main MoE layers first, then the MTP blocks), as HF stores one bias per MoE layer.

Only `safetensors` is needed, not torch: tensors are read as numpy (bf16 via ml_dtypes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from absl import logging
from flax import traverse_util

try:
  from safetensors import safe_open
  from safetensors.numpy import save_file
except ImportError as e:  # the "parity" extra
  raise ImportError("deepseek_jax.hf needs safetensors: pip install -e '.[parity]'") from e

from deepseek_jax.model.config import ModelConfig, yarn_mscale
from deepseek_jax.model.transformer import (Transformer, init_variables, stack_layers,
                                             unstack_layers)

BIAS = "balance/expert_bias"


# Config -------------------------------------------------------------------------

def _need(ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"unsupported Hugging Face config: {what}")


def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """rope_parameters (v5) or rope_scaling + rope_theta (v4 / released) -> our rope fields."""
  rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  _need(not any(isinstance(v, Mapping) for v in rp.values()),
        "per-layer-type rope_parameters")
  kind = rp.get("rope_type", rp.get("type", "default"))
  theta = float(rp.get("rope_theta") or hf.get("rope_theta") or 10000.0)
  _need(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor")) in (None, 1, 1.0),
        "partial_rotary_factor != 1")
  max_pos = hf.get("max_position_embeddings", 4096)
  if kind == "default":
    return dict(rope_theta=theta, rope_original_max_len=int(max_pos))
  _need(kind == "yarn", f"rope type {kind!r} (only 'default' and 'yarn')")
  _need(rp.get("truncate", True), "yarn with truncate=False")
  orig = (rp.get("original_max_position_embeddings")
          or hf.get("original_max_position_embeddings") or max_pos)
  # HF derives the factor from the two lengths when it is missing.
  factor = float(rp.get("factor") or max_pos / orig)
  # A missing mscale / mscale_all_dim reads as 0, which is how HF treats it: no ratio in
  # the cos/sin factor, no mscale^2 on the softmax scale (layers.py tests truthiness).
  mscale, mscale_all = float(rp.get("mscale") or 0.0), float(rp.get("mscale_all_dim") or 0.0)
  if rp.get("attention_factor") is not None:
    ours = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            if mscale and mscale_all else yarn_mscale(factor, 1.0))
    _need(abs(rp["attention_factor"] - ours) < 1e-6,
          f"yarn attention_factor={rp['attention_factor']} != {ours} implied by mscales")
  return dict(rope_theta=theta, rope_factor=factor, rope_original_max_len=int(orig),
              beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
              mscale=mscale, mscale_all_dim=mscale_all)


# HF's class defaults for these are V3's sizes: better a clear error than a silent 2.5.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
             "num_hidden_layers", "num_attention_heads", "n_shared_experts",
             "n_routed_experts", "routed_scaling_factor", "n_group", "topk_group",
             "num_experts_per_tok", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank",
             "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """A HF config.json dict -> ModelConfig; what the model cannot do raises ValueError."""
  absent = [k for k in _REQUIRED if k not in hf]
  if absent:
    raise ValueError(f"Hugging Face config lacks {absent}")
  _need(not hf.get("attention_bias", False), "attention_bias=True")
  _need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}")
  _need("quantization_config" not in hf,
        "quantized weights (e.g. FP8 with weight_scale_inv): dequantize first")
  _need(hf.get("moe_layer_freq", 1) == 1, "moe_layer_freq != 1")
  _need(hf.get("topk_method", "noaux_tc") == "noaux_tc",
        f"topk_method={hf.get('topk_method')!r} (only noaux_tc)")
  n_layers = hf["num_hidden_layers"]
  mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
      n_heads=hf["num_attention_heads"], q_lora_rank=hf["q_lora_rank"],
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      ffn_dim=hf["intermediate_size"], moe_ffn_dim=hf["moe_intermediate_size"],
      first_k_dense=min(hf.get("first_k_dense_replace") or 0, n_layers),
      n_shared_experts=hf.get("n_shared_experts") or 0,
      n_routed_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
      n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
      routed_scaling_factor=float(hf["routed_scaling_factor"]),
      score_func=hf.get("scoring_func", "sigmoid"),
      norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)), mtp_depth=mtp or 0,
      # Released MTP weights are driven by the normed hidden state (HF, vLLM).
      mtp_feed_normed=True,
      init_std=float(hf.get("initializer_range", 0.006)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_from_hf(hf))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The inverse of config_from_hf (runtime fields such as moe_dispatch are not saved)."""
  if cfg.bias_mode != "add":
    raise ValueError(f"ModelConfig.bias_mode={cfg.bias_mode!r}: Hugging Face's "
                     "e_score_correction_bias is additive; only bias_mode='add' exports")
  if cfg.mtp_depth and not cfg.mtp_feed_normed:
    logging.warning("exporting MTP weights trained on the pre-norm hidden state "
                    "(mtp_feed_normed=False); HF and vLLM feed MTP the normed one")
  if cfg.yarn:
    rope = dict(rope_type="yarn", rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
                beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                mscale_all_dim=cfg.mscale_all_dim)
    max_pos = int(round(cfg.rope_original_max_len * cfg.rope_factor))
  else:
    rope, max_pos = dict(rope_type="default", rope_theta=cfg.rope_theta), cfg.rope_original_max_len
  return dict(
      architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
      moe_intermediate_size=cfg.moe_ffn_dim, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      # MLA has no kv-head grouping; HF's eager attention divides heads by this.
      num_key_value_heads=cfg.n_heads,
      n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
      routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
      topk_group=cfg.topk_group, num_experts_per_tok=cfg.top_k,
      first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=cfg.norm_topk_prob,
      scoring_func=cfg.score_func, topk_method="noaux_tc", kv_lora_rank=cfg.kv_lora_rank,
      q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
      qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, hidden_act="silu",
      attention_bias=False, rms_norm_eps=cfg.rms_eps, rope_parameters=rope,
      rope_interleave=True, max_position_embeddings=max_pos,
      tie_word_embeddings=cfg.tie_embeddings, num_nextn_predict_layers=cfg.mtp_depth,
      initializer_range=cfg.init_std, dtype=cfg.param_dtype)


# The mapping table ---------------------------------------------------------------

Arrays = Sequence[Any]


@dataclasses.dataclass(frozen=True)
class _Tf:
  load: Callable[[Arrays], list]   # HF tensors -> our leaves
  save: Callable[[Arrays], list]   # our leaves -> HF tensors


@dataclasses.dataclass(frozen=True)
class _Rule:
  hf: tuple[str, ...]
  ours: tuple[str, ...]
  tf: _Tf
  copy: bool = False    # a duplicate of leaves loaded elsewhere: checked if present, not kept
  write: bool = True    # save_checkpoint writes it (released MTP copies yes, tied lm_head no)


def _rule(hf, ours, tf, **kw) -> _Rule:
  def as_tuple(x):
    return (x,) if isinstance(x, str) else tuple(x)
  return _Rule(as_tuple(hf), as_tuple(ours), tf, **kw)


def _cat(xs, axis):
  # numpy on real arrays (no device copies of a whole checkpoint); jnp under eval_shape.
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.concatenate(xs, axis)
  return jnp.concatenate(xs, axis)


def _perm(x, p):
  return x if p is None else x[..., p]


_SAME = _Tf(lambda xs: list(xs), lambda ys: list(ys))
_LINEAR = _Tf(lambda xs: [xs[0].T], lambda ys: [ys[0].T])                # [O, I] <-> [I, O]
_BATCHED_LINEAR = _Tf(lambda xs: [xs[0].transpose(0, 2, 1)],              # [E, O, I] <-> [E, I, O]
                      lambda ys: [ys[0].transpose(0, 2, 1)])
_STACKED_LINEAR = _Tf(                                                    # E x [O, I] <-> [E, I, O]
    lambda xs: [np.stack([x.T for x in xs])],
    lambda ys: [ys[0][e].T for e in range(ys[0].shape[0])])
_FUSED_GATE_UP = _Tf(                                      # [E, 2F, D] <-> [E, D, F] x 2
    lambda xs: np.split(xs[0].transpose(0, 2, 1), 2, axis=-1),
    lambda ys: [_cat(ys, -1).transpose(0, 2, 1)])


def _out_split(heads: int | None, sizes: Sequence[int], perms: Sequence[Any]) -> _Tf:
  """HF [heads * sum(sizes), I] (per head: part 0 rows, part 1 rows, ...) <-> ours
  [I, heads, size_i] per part ([I, size_i] when heads is None); perms[i] reorders part i."""
  bounds = np.cumsum((0,) + tuple(sizes))
  inverse = [None if p is None else np.argsort(p) for p in perms]

  def load(xs):
    w = xs[0].reshape(heads or 1, bounds[-1], -1).transpose(2, 0, 1)
    w = w if heads else w[:, 0]
    return [_perm(w[..., a:b], p) for a, b, p in zip(bounds[:-1], bounds[1:], perms)]

  def save(ys):
    w = _cat([_perm(y, p) for y, p in zip(ys, inverse)], -1)
    w = w if heads else w[:, None]
    return [w.transpose(1, 2, 0).reshape((heads or 1) * bounds[-1], -1)]

  return _Tf(load, save)


def _in_heads(heads: int) -> _Tf:
  """o_proj: HF [D, heads * O] <-> ours [heads, O, D]."""
  return _Tf(lambda xs: [xs[0].T.reshape(heads, -1, xs[0].shape[0])],
             lambda ys: [ys[0].reshape(-1, ys[0].shape[-1]).T])


def _rope_perm(P: int):
  """Half-split order [0..P/2-1, P/2..P-1] -> adjacent pairs [0, P/2, 1, P/2+1, ...]: with
  q and k rows permuted alike, our adjacent-pair RoPE equals HF's rotate_half form."""
  return np.stack([np.arange(P // 2), np.arange(P // 2, P)], -1).reshape(-1)


def _block_rules(cfg: ModelConfig, hf: str, ours: str, moe: bool, bias_row: int,
                 fused: bool, rope_perm) -> list[_Rule]:
  N, H, P, O, R = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                   cfg.kv_lora_rank)
  a, A = hf + "self_attn.", ours + "attn/"
  q_split = _out_split(N, (H, P), (None, rope_perm))
  rules = [_rule(hf + "input_layernorm.weight", ours + "attn_norm/scale", _SAME),
           _rule(hf + "post_attention_layernorm.weight", ours + "ffn_norm/scale", _SAME)]
  if cfg.q_lora_rank is None:
    rules.append(_rule(a + "q_proj.weight", (A + "w_q_nope", A + "w_q_rope"), q_split))
  else:
    rules += [_rule(a + "q_a_proj.weight", A + "w_dq", _LINEAR),
              _rule(a + "q_a_layernorm.weight", A + "q_norm/scale", _SAME),
              _rule(a + "q_b_proj.weight", (A + "w_uq", A + "w_qr"), q_split)]
  rules += [
      _rule(a + "kv_a_proj_with_mqa.weight", (A + "w_dkv", A + "w_kr"),
            _out_split(None, (R, P), (None, rope_perm))),
      _rule(a + "kv_a_layernorm.weight", A + "kv_norm/scale", _SAME),
      _rule(a + "kv_b_proj.weight", (A + "w_uk", A + "w_uv"), _out_split(N, (H, O), (None, None))),
      _rule(a + "o_proj.weight", A + "w_o", _in_heads(N))]
  m, projs = hf + "mlp.", ("gate", "up", "down")
  if not moe:
    return rules + [_rule(f"{m}{p}_proj.weight", f"{ours}ffn/w_{p}", _LINEAR) for p in projs]
  M = ours + "moe/"
  rules += [_rule(m + "gate.weight", M + "w_router", _LINEAR),
            _rule(m + "gate.e_score_correction_bias", f"{BIAS}/{bias_row}", _SAME)]
  if fused:
    rules += [_rule(m + "experts.gate_up_proj", (M + "w_gate", M + "w_up"), _FUSED_GATE_UP),
              _rule(m + "experts.down_proj", M + "w_down", _BATCHED_LINEAR)]
  else:
    rules += [_rule([f"{m}experts.{j}.{p}_proj.weight" for j in range(cfg.n_routed_experts)],
                    f"{M}w_{p}", _STACKED_LINEAR) for p in projs]
  if cfg.n_shared_experts:
    rules += [_rule(f"{m}shared_experts.{p}_proj.weight", f"{M}shared/w_{p}", _LINEAR)
              for p in projs]
  return rules


def _rules(cfg: ModelConfig, *, fused: Callable[[str], bool], rope_interleave: bool):
  """The whole mapping. fused(hf_layer_prefix): are that layer's experts stored fused?"""
  rope_perm = None if rope_interleave else _rope_perm(cfg.qk_rope_head_dim)
  head = (("params/embed", _SAME) if cfg.tie_embeddings else ("params/head", _LINEAR))
  rules = [_rule("model.embed_tokens.weight", "params/embed", _SAME),
           _rule("model.norm.weight", "params/final_norm/scale", _SAME),
           _rule("lm_head.weight", *head, copy=cfg.tie_embeddings, write=not cfg.tie_embeddings)]
  row = 0
  for i in range(cfg.n_layers):
    hf, moe = f"model.layers.{i}.", cfg.is_moe_layer(i)
    rules += _block_rules(cfg, hf, f"params/layer_{i}/", moe, row, moe and fused(hf), rope_perm)
    row += moe
  for k in range(cfg.mtp_depth):
    # The released MTP layer: a decoder layer plus these, numbered after the main layers.
    hf, ours = f"model.layers.{cfg.n_layers + k}.", f"params/mtp_{k}/"
    rules += [_rule(hf + "enorm.weight", ours + "enorm/scale", _SAME),
              _rule(hf + "hnorm.weight", ours + "hnorm/scale", _SAME),
              _rule(hf + "eh_proj.weight", ours + "w_proj", _LINEAR),  # input [emb ; hidden]
              _rule(hf + "shared_head.norm.weight", ours + "final_norm/scale", _SAME),
              _rule(hf + "embed_tokens.weight", "params/embed", _SAME, copy=True),
              _rule(hf + "shared_head.head.weight", *head, copy=True)]
    moe = cfg.mtp_is_moe
    rules += _block_rules(cfg, hf, ours + "block/", moe, row, moe and fused(hf), rope_perm)
    row += moe
  return rules


# Variables <-> flat leaves --------------------------------------------------------

def _flatten(variables) -> dict[str, Any]:
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(variables).items()}
  bias = flat.pop(BIAS, None)
  if bias is not None:
    if isinstance(bias, jax.ShapeDtypeStruct):
      rows = [jax.ShapeDtypeStruct(bias.shape[1:], bias.dtype)] * bias.shape[0]
    else:
      rows = list(bias)
    flat.update({f"{BIAS}/{r}": row for r, row in enumerate(rows)})
  return flat


def _unflatten(flat: Mapping[str, Any], n_bias_rows: int):
  flat = dict(flat)
  if n_bias_rows:
    flat[BIAS] = np.stack([flat.pop(f"{BIAS}/{r}") for r in range(n_bias_rows)])
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _expected_leaves(model: Transformer) -> dict[str, jax.ShapeDtypeStruct]:
  return _flatten(jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0))))


def _names(names: Sequence[str], n: int = 8) -> str:
  names = sorted(names)
  return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


# Loading -------------------------------------------------------------------------

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
  expected = _expected_leaves(model)
  rules = _rules(cfg, fused=lambda hf: hf + "mlp.experts.gate_up_proj" in where,
                 rope_interleave=hf_config.get("rope_interleave", True))

  used = {n for r in rules for n in r.hf}
  missing = [n for r in rules if not r.copy for n in r.hf if n not in where]
  unused = [n for n in where if n not in used and not n.startswith(dropped)]
  if missing:
    raise ValueError(f"{path}: missing tensor(s): {_names(missing)}")
  if unused:
    raise ValueError(f"{path}: tensor(s) not used by the model: {_names(unused)}")

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
      want = jax.eval_shape(r.tf.save, [expected[o] for o in r.ours])
      bad = [f"{n} {x.shape} (want {w.shape})" for n, x, w in zip(r.hf, xs, want)
             if tuple(x.shape) != tuple(w.shape)]
      if bad:
        raise ValueError(f"{path}: wrong shape: {_names(bad, 4)}")
      ys = [np.ascontiguousarray(y) for y in r.tf.load(xs)]
      if any(y.shape != expected[o].shape for o, y in zip(r.ours, ys)):  # a table bug
        raise ValueError(f"mapping table mismatch: {r.hf} -> {[y.shape for y in ys]}, want "
                         f"{[expected[o].shape for o in r.ours]}")
      if r.copy:
        if not all(np.array_equal(y, flat[o]) for o, y in zip(r.ours, ys)):
          raise ValueError(f"{path}: {_names(r.hf)} should be a copy of the main model's "
                           f"{_names(r.ours)} but differs")
      else:
        flat.update(zip(r.ours, ys))

  if flat.keys() != expected.keys():  # a bug in the table, not in the checkpoint
    raise ValueError(f"mapping table mismatch: no tensor for "
                     f"{_names(expected.keys() - flat.keys())}; not in the model: "
                     f"{_names(flat.keys() - expected.keys())}")
  variables = _unflatten(flat, cfg.n_routed_layers)
  if scan:
    cfg = cfg.replace(scan_layers=True)
    variables["params"] = stack_layers(variables["params"], cfg)
    model = Transformer(cfg)
  return model, variables


# Saving --------------------------------------------------------------------------

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
  flat = _flatten(variables)
  rules = _rules(cfg, fused=lambda hf: fused_experts, rope_interleave=True)
  needed = {o for r in rules for o in r.ours}
  if needed != flat.keys():
    raise ValueError(f"variables do not match cfg: missing {_names(needed - flat.keys())}; "
                     f"unexpected {_names(flat.keys() - needed)}")
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
    arrays = r.tf.save([np.asarray(flat[o]) for o in r.ours])
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


def save_tokenizer(path, tokenizer) -> None:
  """Our tokenizer (data/tokenizers.py: BPETokenizer or ByteTokenizer) -> tokenizer.json and
  tokenizer_config.json that `AutoTokenizer.from_pretrained` reads offline: the same ids
  (our byte tokenizer becomes a byte-level BPE without merges whose ids are the byte
  values), the end-of-document token the data was prepared with (<|eos|> for ours) and
  its begin token where it has one (a Hugging Face tokenizer's, e.g. DeepSeek-V3's)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from deepseek_jax.data.tokenizers import EOS, ByteTokenizer
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if isinstance(tokenizer, ByteTokenizer):
    byte_char = _bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    vocab[EOS] = tokenizer.eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    eos, bos = EOS, None
  else:
    tok = tokenizer.tok
    eos = tok.id_to_token(tokenizer.eos_id)
    bos = None if tokenizer.bos_id is None else tok.id_to_token(tokenizer.bos_id)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
      "bos_token": bos, "pad_token": eos, "add_bos_token": bos is not None,
      "add_eos_token": False, "clean_up_tokenization_spaces": False,
      "model_max_length": 1 << 30}, indent=2) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (what byte-level BPE vocabularies use)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out
