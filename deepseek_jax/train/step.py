"""The train state, the optimizer, and ONE pure train step (plus the eval step).

The step: gradient accumulation over microbatches (lax.scan), loss = cross-entropy +
MTP loss + configured balance losses, AdamW update, then the aux-loss-free bias update
from the step's GLOBAL expert loads (summed over microbatches; under jit the token sum
runs over every data/expert shard, so it is the global count). It returns new state and
metrics; nothing leaves the device until the loop asks for it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import struct

from deepseek_jax import balancing
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train.losses import lm_losses
from deepseek_jax.model.transformer import BALANCE, Transformer


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  expert_bias: jax.Array | None      # [L, E] float32 balancing state; not a parameter


def lr_schedule(opt_cfg, total_steps: int):
  """Linear warmup, constant, then cosine decay to min_lr_ratio * peak (V3 4.2)."""
  peak = opt_cfg.peak_lr
  warm = max(int(opt_cfg.warmup_steps), 0)
  decay_start = max(int(opt_cfg.decay_start_frac * total_steps), warm)
  decay_len = max(total_steps - decay_start, 1)
  floor = peak * opt_cfg.min_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = peak * jnp.minimum(1.0, (step + 1) / max(warm, 1))
    frac = jnp.clip((step - decay_start) / decay_len, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1 + jnp.cos(math.pi * frac))
    return jnp.where(step < warm, warmup, jnp.where(step < decay_start, peak, cosine))
  return schedule


def decay_mask(params):
  """Weight decay on matrices only: not on norm scales (1-D); the bias is not a param."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int):
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip),
      optax.adamw(lr_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                  eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=decay_mask))


def init_state(model: Transformer, tx, rng, expert_bias=None) -> TrainState:
  from deepseek_jax.model.transformer import init_variables
  variables = init_variables(model, rng)
  params = variables["params"]
  bias = variables.get(BALANCE, {}).get("expert_bias") if expert_bias is None else expert_bias
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    expert_bias=bias)


def _variables(state_params, bias):
  v = {"params": state_params}
  if bias is not None:
    v[BALANCE] = {"expert_bias": bias}
  return v


def balance_hparams(cfg) -> dict:
  """Runtime (traced) balancing coefficients: changing them does not recompile."""
  b = cfg.balance
  return {"aux_alpha": b.aux_alpha, "seq_aux_alpha": b.seq_aux_alpha,
          "batch_aux_alpha": b.batch_aux_alpha, "bias_rate": b.bias_rate,
          "bias_freeze_step": math.floor(b.bias_freeze_frac * cfg.total_steps)}


def forward_losses(model: Transformer, params, bias, batch, cfg, hparams):
  """(total loss, (metrics, loads [L,E] or None, dropped [L] or None)) for one batch."""
  inputs = batch["tokens"][:, :-1]
  if cfg.data.doc_attention_mask:
    positions, segments = batch["positions"][:, :-1], batch["segments"][:, :-1]
  else:  # V3's packing: attention crosses documents, positions run along the row
    positions, segments = None, None
  out = model.apply(_variables(params, bias), inputs, positions, segments)
  # Targets never cross a document boundary, whatever the attention does.
  m = lm_losses(out, batch["tokens"], batch["segments"], cfg.mtp_lambda)
  total = m["loss"]
  metrics = {"ce": m["ce"], "n_tokens": m["n_tokens"]}
  if "mtp" in m:
    metrics["mtp"] = m["mtp"]
  if out.moe is not None:
    for name, value in balancing.balance_terms(out.moe, model.cfg.top_k).items():
      metrics[f"balance/{name}"] = value          # unweighted, logged for every strategy
      total = total + hparams[f"{name}_alpha"] * value
  metrics["loss"] = total
  if out.moe is None:
    return total, (metrics, None, None)
  metrics["shards_per_token"] = out.moe.shards_per_token  # [L]; > 1 only expert-parallel
  return total, (metrics, out.moe.load_E, out.moe.dropped)


def bias_rate(hparams, step):
  """u, set to 0 from bias_freeze_step on (V3: the last ~3% of tokens)."""
  return jnp.where(step >= hparams["bias_freeze_step"], 0.0, hparams["bias_rate"])


def train_step(state: TrainState, batch, hparams, *, model: Transformer, tx, cfg):
  """One optimizer step on a global batch {"tokens", "segments", "positions"} [B, T+1];
  hparams: balance_hparams(cfg) as arrays."""
  M = cfg.microbatches
  micro = jax.tree.map(lambda x: x.reshape((M, x.shape[0] // M) + x.shape[1:]), batch)
  grad_fn = jax.value_and_grad(forward_losses, argnums=1, has_aux=True)

  def accumulate(carry, mb):
    grads, metrics, load, dropped = carry
    (_, (m, l, d)), g = grad_fn(model, state.params, state.expert_bias, mb, cfg, hparams)
    add = lambda a, b: None if a is None else a + b
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m),
            add(load, l), add(dropped, d)), None

  if M == 1:   # no accumulation loop: one plain gradient (the loop would add copies)
    (_, (metrics, load_LE, dropped_L)), grads = grad_fn(
        model, state.params, state.expert_bias, batch, cfg, hparams)
    return _apply_update(state, grads, metrics, load_LE, dropped_L, tx, cfg, hparams)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  shapes = jax.eval_shape(
      lambda mb: grad_fn(model, state.params, state.expert_bias, mb, cfg, hparams),
      jax.tree.map(lambda x: x[0], micro))
  (_, (m0, l0, d0)), _ = shapes
  init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0),
          None if l0 is None else jnp.zeros(l0.shape, l0.dtype),
          None if d0 is None else jnp.zeros(d0.shape, d0.dtype))
  (grads, metrics, load_LE, dropped_L), _ = jax.lax.scan(accumulate, init, micro)
  grads = jax.tree.map(lambda g: g / M, grads)
  metrics = {k: (v if k == "n_tokens" else v / M) for k, v in metrics.items()}
  return _apply_update(state, grads, metrics, load_LE, dropped_L, tx, cfg, hparams)


def _apply_update(state, grads, metrics, load_LE, dropped_L, tx, cfg, hparams):
  """AdamW on the (accumulated) gradients, then the bias update from the step's loads."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bias = state.expert_bias
  if bias is not None:
    rate = bias_rate(hparams, state.step)
    bias = balancing.update_bias(bias, load_LE, rate, cfg.balance.bias_rule)
    metrics["load"] = load_LE
    metrics["maxvio"] = balancing.max_violation(load_LE)
    routed = jnp.maximum(load_LE.sum(-1) + dropped_L, 1.0)
    metrics["dropped_frac"] = jnp.sum(dropped_L) / jnp.sum(routed)
    metrics["bias_rate"] = rate
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["lr"] = lr_schedule(cfg.optimizer, cfg.total_steps)(state.step)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         expert_bias=bias)
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model: Transformer, cfg):
  """Summed CE (main and MTP depths), token counts and expert loads; no state change
  (in particular no bias update: evaluation never balances)."""
  zeros = {k: 0.0 for k in ("aux_alpha", "seq_aux_alpha", "batch_aux_alpha")}
  _, (m, load, dropped) = forward_losses(model, state.params, state.expert_bias, batch, cfg,
                                         zeros)
  n = m["n_tokens"]
  out = {"ce_sum": m["ce"] * n, "n_tokens": n}
  if "mtp" in m:
    out["mtp_sum"] = m["mtp"] * n
  if load is not None:
    out["load"] = load
    out["dropped"] = dropped
  return out


def jit_steps(model, tx, cfg, state_shardings, batch_shardings):
  """The jitted train and eval steps, with shardings at the boundary and donated state."""
  train = jax.jit(functools.partial(train_step, model=model, tx=tx, cfg=cfg),
                  in_shardings=(state_shardings, batch_shardings, None),
                  out_shardings=(state_shardings, None), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=model, cfg=cfg),
                     in_shardings=(state_shardings, batch_shardings))
  return train, evaluate
