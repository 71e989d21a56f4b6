"""The train state, the optimizer, and ONE pure train step (plus the eval step).

The step: gradient accumulation over microbatches (lax.scan), loss = cross-entropy +
MTP loss (V3's lambda schedule) + configured balance losses, AdamW update, then the
aux-loss-free bias update from the step's GLOBAL expert loads (summed over microbatches;
under jit the token sum runs over every data/expert shard, so it is the global count).
balance.count_scope="micro" instead updates the bias after every microbatch and lets
the batch-level losses count each microbatch alone (balancing.py). It returns new state and
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
from deepseek_jax.model.partitioning import constrain
from deepseek_jax.train.losses import lm_losses, sequence_sums
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


# Parameters that weight decay leaves alone, by name: every RMSNorm's `scale` (SPEC.md
# section 6: decay on weight matrices only). By name, not rank: with scanned layers a
# norm scale is [layers, D], 2-D like a matrix. The expert bias is not a parameter.
NO_DECAY_NAMES = ("scale",)


def _param_name(path) -> str:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ""


def decay_mask(params):
  """True for the parameters AdamW decays: every weight matrix (embedding, head,
  projections, experts, router), not the norm scales (NO_DECAY_NAMES)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _param_name(path) not in NO_DECAY_NAMES, params)


def make_optimizer(opt_cfg, total_steps: int, lr=None):
  """AdamW with clipping; lr: a step -> learning-rate schedule (a run's token-based
  recipe, recipe.Recipe.lr_schedule), default lr_schedule(opt_cfg, total_steps)."""
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip),
      optax.adamw(lr or lr_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                  eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, mask=decay_mask))


def init_state(model: Transformer, tx, rng, expert_bias=None) -> TrainState:
  from deepseek_jax.model.transformer import init_variables
  variables = init_variables(model, rng)
  params = variables["params"]
  bias = variables.get(BALANCE, {}).get("expert_bias") if expert_bias is None else expert_bias
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    expert_bias=bias)


def model_variables(state_params, bias):
  """The variables Transformer.apply takes: the parameters and the balancing bias."""
  v = {"params": state_params}
  if bias is not None:
    v[BALANCE] = {"expert_bias": bias}
  return v


def balance_hparams(cfg) -> dict:
  """Runtime (traced) coefficients: changing them does not recompile. A token-based
  recipe's mtp_lambda and bias_rate (schedule section) replace the step-based fields."""
  b = cfg.balance
  h = {"aux_alpha": b.aux_alpha, "seq_aux_alpha": b.seq_aux_alpha,
       "batch_aux_alpha": b.batch_aux_alpha, "bias_rate": b.bias_rate,
       "bias_freeze_step": math.floor(b.bias_freeze_frac * cfg.total_steps),
       "mtp_lambda": cfg.mtp_lambda,
       "mtp_lambda_late": cfg.get("mtp_lambda_late", cfg.mtp_lambda),
       "mtp_lambda_switch_step": cfg.get("mtp_lambda_switch_step", -1)}
  if cfg.get("schedule") is None:
    return h
  from deepseek_jax.train.recipe import Recipe
  r = Recipe(cfg)
  if r.switches["mtp_lambda"] is not None:
    first, late, _ = r.switches["mtp_lambda"]
    h.update(mtp_lambda=first, mtp_lambda_late=late,
             mtp_lambda_switch_step=r.switch_step("mtp_lambda"))
  if r.switches["bias_rate"] is not None:
    first, late, _ = r.switches["bias_rate"]
    if late not in (0.0, first):
      raise ValueError(f"schedule.bias_rate: the later phase must be 0 (a freeze, as V3's "
                       f"last 500B tokens), not {late}")
    freeze = r.switch_step("bias_rate")
    h.update(bias_rate=first, bias_freeze_step=cfg.total_steps if freeze < 0 else freeze)
  return h


def run_lr_schedule(cfg):
  """The run's step -> learning-rate schedule: the recipe's when schedule.lr is set, else
  the step-based one (lr_schedule). What the optimizer applies and the step logs."""
  if cfg.get("schedule") is None or not cfg.schedule.get("lr"):
    return lr_schedule(cfg.optimizer, cfg.total_steps)
  from deepseek_jax.train.recipe import Recipe
  return Recipe(cfg).lr_schedule()


def mtp_lambda(hparams, step):
  """V3's MTP weight schedule: lambda until mtp_lambda_switch_step, then the late value
  (0.3 for the first 10T tokens, then 0.1); a negative switch step never switches."""
  switch = hparams["mtp_lambda_switch_step"]
  late = (switch >= 0) & (step >= switch)
  return jnp.where(late, hparams["mtp_lambda_late"], hparams["mtp_lambda"])


def _apply(model: Transformer, params, bias, batch, cfg):
  inputs = batch["tokens"][:, :-1]
  if cfg.data.doc_attention_mask:
    positions, segments = batch["positions"][:, :-1], batch["segments"][:, :-1]
  else:  # V3's packing: attention crosses documents, positions run along the row
    positions, segments = None, None
  return model.apply(model_variables(params, bias), inputs, positions, segments)


def forward_losses(model: Transformer, params, bias, batch, cfg, hparams, counts=None):
  """(total loss, (metrics, routing)) for one batch; routing {"load" [L,E], "dropped"
  [L], and "quantile_target" [L,E] with model.quantile_stats} or None without MoE.
  counts: the global batch's routing-map counts for the batch-level losses (see
  balancing.batch_aux_loss); None: this batch's own."""
  out = _apply(model, params, bias, batch, cfg)
  # With the document mask, neither attention nor targets cross a document boundary;
  # without it (V3's packing) both do, and only padding is masked.
  m = lm_losses(out, batch["tokens"], batch["segments"], hparams["mtp_lambda"],
                same_document=cfg.data.doc_attention_mask)
  total = m["loss"]
  metrics = {"ce": m["ce"], "n_tokens": m["n_tokens"]}
  if "mtp" in m:
    metrics["mtp"] = m["mtp"]
  if out.moe is not None:
    for name, value in balancing.balance_terms(out.moe, model.cfg.top_k, counts).items():
      metrics[f"balance/{name}"] = value          # unweighted, logged for every strategy
      total = total + hparams[f"{name}_alpha"] * value
  metrics["loss"] = total
  if out.moe is None:
    return total, (metrics, None)
  metrics["shards_per_token"] = out.moe.shards_per_token  # [L]; > 1 only expert-parallel
  routing = {"load": out.moe.load_E, "dropped": out.moe.dropped}
  if out.moe.quantile_target_E is not None:
    routing["quantile_target"] = out.moe.quantile_target_E
  return total, (metrics, routing)


def bias_rate(hparams, step):
  """u, set to 0 from bias_freeze_step on (V3: the last ~3% of tokens)."""
  return jnp.where(step >= hparams["bias_freeze_step"], 0.0, hparams["bias_rate"])


def _new_bias(bias, routing, rate, cfg, n_batches: int = 1):
  """The balancing update from one batch's routing (QB's target: its mean over batches)."""
  target = routing.get("quantile_target")
  return balancing.update_bias(bias, routing["load"], rate, cfg.balance.bias_rule,
                               None if target is None else target / n_batches)


def _global_counts(model, params, bias, micro, cfg):
  """The whole step's routing-map counts (forward only, one pass over the microbatches):
  f_i of the batch-level losses over the GLOBAL batch (balance.count_scope "global")."""
  def one(mb):
    stats = _apply(model, jax.lax.stop_gradient(params), bias, mb, cfg).moe
    return balancing.batch_counts(stats)
  count_MLE, n_ML = jax.lax.map(one, micro)
  return count_MLE.sum(0), n_ML.sum(0)


def _uses_batch_losses(cfg) -> bool:
  return bool(cfg.balance.aux_alpha or cfg.balance.batch_aux_alpha)


def split_microbatches(batch, M: int):
  """[B, ...] -> [M, B/M, ...] with STRIDED microbatches: microbatch m holds rows m,
  M+m, 2M+m, ... With the batch split in contiguous chunks over the batch shards, every
  shard then holds its equal part of every microbatch (contiguous microbatches would
  live on a few shards each and be resharded inside the loop)."""
  def split(x):
    x = x.reshape((x.shape[0] // M, M) + x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, hparams, *, model: Transformer, tx, cfg):
  """One optimizer step on a global batch {"tokens", "segments", "positions"} [B, T+1];
  hparams: balance_hparams(cfg) as arrays."""
  M = cfg.microbatches
  scope = cfg.balance.get("count_scope", "global")
  hparams = {**hparams, "mtp_lambda": mtp_lambda(hparams, state.step)}
  rate = bias_rate(hparams, state.step)
  grad_fn = jax.value_and_grad(forward_losses, argnums=1, has_aux=True)

  if M == 1:   # no accumulation loop: one plain gradient (the loop would add copies)
    (_, (metrics, routing)), grads = grad_fn(model, state.params, state.expert_bias, batch,
                                             cfg, hparams)
    bias = state.expert_bias
    if bias is not None:
      bias = _new_bias(bias, routing, rate, cfg)
    return _apply_update(state, grads, metrics, routing, bias, rate, tx, cfg)

  micro = split_microbatches(batch, M)
  counts = None
  if scope == "global" and state.expert_bias is not None and _uses_batch_losses(cfg):
    counts = _global_counts(model, state.params, state.expert_bias, micro, cfg)
  per_micro = scope == "micro" and state.expert_bias is not None

  def accumulate(carry, mb):
    grads, metrics, routing, bias = carry
    (_, (m, r)), g = grad_fn(model, state.params, bias, mb, cfg, hparams, counts)
    if per_micro:   # each microbatch's own loads move the bias before the next one
      bias = _new_bias(bias, r, rate, cfg)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    return (add(grads, g), add(metrics, m), None if r is None else add(routing, r),
            bias), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (_, (m0, r0)), _ = jax.eval_shape(
      lambda mb: grad_fn(model, state.params, state.expert_bias, mb, cfg, hparams, counts),
      jax.tree.map(lambda x: x[0], micro))
  zeros_like = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  init = (zeros, zeros_like(m0), None if r0 is None else zeros_like(r0), state.expert_bias)
  (grads, metrics, routing, bias), _ = jax.lax.scan(accumulate, init, micro)
  grads = jax.tree.map(lambda g: g / M, grads)
  metrics = {k: (v if k == "n_tokens" else v / M) for k, v in metrics.items()}
  if bias is not None and not per_micro:   # one update from the whole step's loads
    bias = _new_bias(bias, routing, rate, cfg, n_batches=M)
  return _apply_update(state, grads, metrics, routing, bias, rate, tx, cfg)


def _apply_update(state, grads, metrics, routing, bias, rate, tx, cfg):
  """AdamW on the (accumulated) gradients; the new bias and the step's routing metrics.

  A step whose loss or gradient norm is not finite is not applied (PaLM's and MaxText's
  policy): parameters, optimizer state and bias stay as they were (a select fused into
  the update, no second copy of the state), the step counter and the data move on, and
  metrics "skipped" = 1 with "grad_finite" [groups] saying which top-level parameter
  groups (sorted names) had a finite gradient. The loop stops after
  cfg.max_skipped_steps such steps in a row."""
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  if bias is not None:
    bias = keep(bias, state.expert_bias)
  metrics["skipped"] = (~ok).astype(jnp.float32)
  metrics["grad_finite"] = jnp.stack([jnp.isfinite(optax.global_norm(grads[k]))
                                      for k in sorted(grads)])
  if routing is not None:
    load_LE, dropped_L = routing["load"], routing["dropped"]
    metrics["load"] = load_LE
    metrics["maxvio"] = balancing.max_violation(load_LE)
    # load counts every routed assignment, the dropped ones included (it is taken from
    # the routing, before the dispatch): it alone is the denominator.
    metrics["dropped_frac"] = jnp.sum(dropped_L) / jnp.maximum(jnp.sum(load_LE), 1.0)
    metrics["bias_rate"] = rate
  metrics["grad_norm"] = grad_norm
  metrics["lr"] = run_lr_schedule(cfg)(state.step)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         expert_bias=bias)
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model: Transformer, cfg):
  """Validation sums per sequence, each with a leading batch dim B: CE and target counts
  of the main head and each MTP depth (losses.sequence_sums) and, with MoE, each routed
  layer's expert loads "load" [B, L, E]. Nothing is summed over the batch, so on a
  data-parallel mesh the step runs without a collective; the caller accumulates batches
  on device and reduces once (validation.evaluate). No state change (in particular no bias
  update: evaluation never balances)."""
  out = _apply(model, state.params, state.expert_bias, batch, cfg)
  sums = sequence_sums(out, batch["tokens"], batch["segments"],
                       same_document=cfg.data.doc_attention_mask)
  if out.moe is not None:
    sums["load"] = jnp.moveaxis(out.moe.load_BE, 0, 1)
  return sums


def jit_steps(model, tx, cfg, state_shardings, batch_shardings):
  """The jitted train and eval steps, with shardings at the boundary and donated state."""
  train = jax.jit(functools.partial(train_step, model=model, tx=tx, cfg=cfg),
                  in_shardings=(state_shardings, batch_shardings, None),
                  out_shardings=(state_shardings, None), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=model, cfg=cfg),
                     in_shardings=(state_shardings, batch_shardings))
  return train, evaluate
