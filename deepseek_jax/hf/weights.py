"""Hugging Face tensor names and shapes <-> our variables: the one table of weight rules.

Each rule ties some HF tensors to some of our leaves through a pair of inverse functions
(`load`: HF -> ours, `save`: ours -> HF). HF Linear weights are [out, in]; ours are
[in, ...], split per head where MLA needs it.

Leaves are named by their path in the variables tree ("params/layer_1/attn/w_uq"); the
balancing bias [L, E] is named by rows ("balance/expert_bias/3"), one per routed layer
(main MoE layers first, then the MTP blocks), as HF stores one bias per MoE layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.transformer import Transformer, init_variables

BIAS = "balance/expert_bias"

Arrays = Sequence[Any]


@dataclasses.dataclass(frozen=True)
class Conversion:
  """A pair of inverse functions between some HF tensors and some of our leaves."""
  load: Callable[[Arrays], list]   # HF tensors -> our leaves
  save: Callable[[Arrays], list]   # our leaves -> HF tensors


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """HF tensors `hf` <-> our leaves `ours` (paths), through `conversion`."""
  hf: tuple[str, ...]
  ours: tuple[str, ...]
  conversion: Conversion
  copy: bool = False    # a duplicate of leaves loaded elsewhere: checked if present, not kept
  write: bool = True    # save_checkpoint writes it (released MTP copies yes, tied lm_head no)


def _rule(hf, ours, conversion, **kw) -> WeightRule:
  def as_tuple(x):
    return (x,) if isinstance(x, str) else tuple(x)
  return WeightRule(as_tuple(hf), as_tuple(ours), conversion, **kw)


def _concat(xs, axis):
  # numpy on real arrays (no device copies of a whole checkpoint); jnp under eval_shape.
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.concatenate(xs, axis)
  return jnp.concatenate(xs, axis)


def _permute_last(x, p):
  return x if p is None else x[..., p]


_SAME = Conversion(lambda xs: list(xs), lambda ys: list(ys))
_LINEAR = Conversion(lambda xs: [xs[0].T], lambda ys: [ys[0].T])         # [O, I] <-> [I, O]
_BATCHED_LINEAR = Conversion(                                    # [E, O, I] <-> [E, I, O]
    lambda xs: [xs[0].transpose(0, 2, 1)], lambda ys: [ys[0].transpose(0, 2, 1)])
_STACKED_LINEAR = Conversion(                                    # E x [O, I] <-> [E, I, O]
    lambda xs: [np.stack([x.T for x in xs])],
    lambda ys: [ys[0][e].T for e in range(ys[0].shape[0])])
_FUSED_GATE_UP = Conversion(                                 # [E, 2F, D] <-> [E, D, F] x 2
    lambda xs: np.split(xs[0].transpose(0, 2, 1), 2, axis=-1),
    lambda ys: [_concat(ys, -1).transpose(0, 2, 1)])


def _split_out_rows(heads: int | None, sizes: Sequence[int],
                    perms: Sequence[Any]) -> Conversion:
  """HF [heads * sum(sizes), I] (per head: part 0 rows, part 1 rows, ...) <-> ours
  [I, heads, size_i] per part ([I, size_i] when heads is None); perms[i] reorders part i."""
  bounds = np.cumsum((0,) + tuple(sizes))
  inverse = [None if p is None else np.argsort(p) for p in perms]

  def load(xs):
    w = xs[0].reshape(heads or 1, bounds[-1], -1).transpose(2, 0, 1)
    w = w if heads else w[:, 0]
    return [_permute_last(w[..., a:b], p) for a, b, p in zip(bounds[:-1], bounds[1:], perms)]

  def save(ys):
    w = _concat([_permute_last(y, p) for y, p in zip(ys, inverse)], -1)
    w = w if heads else w[:, None]
    return [w.transpose(1, 2, 0).reshape((heads or 1) * bounds[-1], -1)]

  return Conversion(load, save)


def _split_in_heads(heads: int) -> Conversion:
  """o_proj: HF [D, heads * O] <-> ours [heads, O, D]."""
  return Conversion(lambda xs: [xs[0].T.reshape(heads, -1, xs[0].shape[0])],
                    lambda ys: [ys[0].reshape(-1, ys[0].shape[-1]).T])


def _rope_half_to_pairs(P: int):
  """Half-split order [0..P/2-1, P/2..P-1] -> adjacent pairs [0, P/2, 1, P/2+1, ...]: with
  q and k rows permuted alike, our adjacent-pair RoPE equals HF's rotate_half form."""
  return np.stack([np.arange(P // 2), np.arange(P // 2, P)], -1).reshape(-1)


def _block_weight_rules(cfg: ModelConfig, hf: str, ours: str, moe: bool, bias_row: int,
                        fused: bool, rope_perm) -> list[WeightRule]:
  """One decoder block's rules (attention, then the dense FFN or the MoE)."""
  N, H, P, O, R = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                   cfg.kv_lora_rank)
  a, A = hf + "self_attn.", ours + "attn/"
  q_split = _split_out_rows(N, (H, P), (None, rope_perm))
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
            _split_out_rows(None, (R, P), (None, rope_perm))),
      _rule(a + "kv_a_layernorm.weight", A + "kv_norm/scale", _SAME),
      _rule(a + "kv_b_proj.weight", (A + "w_uk", A + "w_uv"),
            _split_out_rows(N, (H, O), (None, None))),
      _rule(a + "o_proj.weight", A + "w_o", _split_in_heads(N))]
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


def weight_rules(cfg: ModelConfig, *, fused: Callable[[str], bool],
                 rope_interleave: bool) -> list[WeightRule]:
  """The whole mapping. fused(hf_layer_prefix): are that layer's experts stored fused?"""
  rope_perm = None if rope_interleave else _rope_half_to_pairs(cfg.qk_rope_head_dim)
  head = (("params/embed", _SAME) if cfg.tie_embeddings else ("params/head", _LINEAR))
  rules = [_rule("model.embed_tokens.weight", "params/embed", _SAME),
           _rule("model.norm.weight", "params/final_norm/scale", _SAME),
           _rule("lm_head.weight", *head, copy=cfg.tie_embeddings, write=not cfg.tie_embeddings)]
  row = 0
  for i in range(cfg.n_layers):
    hf, moe = f"model.layers.{i}.", cfg.is_moe_layer(i)
    rules += _block_weight_rules(cfg, hf, f"params/layer_{i}/", moe, row, moe and fused(hf),
                                 rope_perm)
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
    rules += _block_weight_rules(cfg, hf, ours + "block/", moe, row, moe and fused(hf), rope_perm)
    row += moe
  return rules


# Variables <-> flat leaves --------------------------------------------------------

def flatten_leaves(variables) -> dict[str, Any]:
  """{leaf path: array}, the balancing bias split into its rows."""
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(variables).items()}
  bias = flat.pop(BIAS, None)
  if bias is not None:
    if isinstance(bias, jax.ShapeDtypeStruct):
      rows = [jax.ShapeDtypeStruct(bias.shape[1:], bias.dtype)] * bias.shape[0]
    else:
      rows = list(bias)
    flat.update({f"{BIAS}/{r}": row for r, row in enumerate(rows)})
  return flat


def unflatten_leaves(flat: Mapping[str, Any], n_bias_rows: int):
  """The inverse of flatten_leaves: the variables tree, the bias rows stacked again."""
  flat = dict(flat)
  if n_bias_rows:
    flat[BIAS] = np.stack([flat.pop(f"{BIAS}/{r}") for r in range(n_bias_rows)])
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def expected_leaves(model: Transformer) -> dict[str, jax.ShapeDtypeStruct]:
  """The flat leaves `model` has, as shapes (nothing allocated)."""
  return flatten_leaves(jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0))))

