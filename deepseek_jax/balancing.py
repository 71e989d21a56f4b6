"""Expert load balancing: the auxiliary-loss-free bias (LFB Alg. 1, V3 2.1.2), the
auxiliary losses it replaces, and MaxVio.

Everything here is a pure function of the MoEStats the model returns (leading dim L =
routed layers) and of the bias array [L, E]; the train step calls them explicitly.

Strategy names (configs/ and experiments/balancing_ablation.py):
  none          nothing
  aux           classic Switch/GShard loss over the batch: alpha * sum_i f_i P_i with
                P_i the mean raw affinity s_i (LFB's baseline, alpha 1e-3)
  seq_aux       V3 sequence-wise loss (eqs 17-20): f_i, P_i per sequence with the
                normalised affinity s_i / sum_j s_j, averaged over sequences
  batch_aux     the same statistics over the whole batch (V3 4.5.3)
  bias          b_i += u * sign(mean_load - load_i) after each step (u 1e-3)
  bias_seq_aux  V3's combination: bias + seq_aux at alpha 1e-4
  bias_magnitude  LFB's variant rule: b_i += u * (mean_load - load_i) / mean_load
  bias_mult     LFB's multiplicative use: top-K of s_i * b_i, b starting at 1
                (ModelConfig.bias_mode="mul"), updated by the same sign rule
  bias_freeze   V3's schedule: the sign rule, u = 0 for the last 3% of training
For every loss f_i = E / (K T) * (tokens routed to i by plain top-K of the UNBIASED
scores), so the losses see the router itself, not the bias's correction of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.model.moe import MoEStats

BIAS_RULES = ("sign", "magnitude")


def _f(count_E, n_tokens, top_k):
  E = count_E.shape[-1]
  return E / top_k * count_E / jnp.maximum(n_tokens, 1.0)[..., None]


def seq_aux_loss(stats: MoEStats, top_k: int):
  """V3 eqs 17-20, averaged over sequences and layers (alpha not applied)."""
  n_LB = stats.n_tokens_B
  f_LBE = _f(stats.aux_count_BE, n_LB, top_k)
  p_LBE = stats.aux_prob_BE / jnp.maximum(n_LB, 1.0)[..., None]
  per_seq_LB = jnp.sum(f_LBE * p_LBE, axis=-1)
  has_tokens = (n_LB > 0).astype(jnp.float32)
  return jnp.sum(per_seq_LB * has_tokens) / jnp.maximum(has_tokens.sum(), 1.0)


def batch_aux_loss(stats: MoEStats, top_k: int, raw_scores: bool = False):
  """sum_i f_i P_i over the whole batch, averaged over layers (alpha not applied).

  raw_scores=False: P_i = mean normalised affinity (V3's batch-wise loss);
  raw_scores=True:  P_i = mean raw affinity s_i (the classic loss of the LFB baseline).
  """
  n_L = stats.n_tokens_B.sum(-1)
  f_LE = _f(stats.aux_count_BE.sum(-2), n_L, top_k)
  prob_BE = stats.aux_score_BE if raw_scores else stats.aux_prob_BE
  p_LE = prob_BE.sum(-2) / jnp.maximum(n_L, 1.0)[..., None]
  return jnp.mean(jnp.sum(f_LE * p_LE, axis=-1))


LOSSES = ("aux", "seq_aux", "batch_aux")


def balance_terms(stats: MoEStats, top_k: int):
  """The three balance losses WITHOUT their alphas: {"aux", "seq_aux", "batch_aux"}.

  All three are cheap, so the train step always computes them (every run logs what each
  loss would read) and weights them by runtime alphas: strategies differ in numbers
  only, and share one compiled step.
  """
  return {"aux": batch_aux_loss(stats, top_k, raw_scores=True),
          "seq_aux": seq_aux_loss(stats, top_k),
          "batch_aux": batch_aux_loss(stats, top_k)}


def update_bias(bias_LE, load_LE, rate, rule: str = "sign"):
  """One step of the aux-loss-free update from a step's GLOBAL per-expert loads.

  sign:       b_i += u * sign(mean_load - load_i)           (LFB Alg. 1, V3)
  magnitude:  b_i += u * (mean_load - load_i) / mean_load   (LFB's variant; the error is
              taken relative to the mean so u keeps its meaning at any batch size)
  A layer that routed nothing this step (e.g. MTP skipped) is left unchanged.
  """
  load_LE = load_LE.astype(jnp.float32)
  mean_L1 = jnp.mean(load_LE, axis=-1, keepdims=True)
  if rule == "sign":
    delta = jnp.sign(mean_L1 - load_LE)
  elif rule == "magnitude":
    delta = (mean_L1 - load_LE) / jnp.maximum(mean_L1, 1e-9)
  else:
    raise ValueError(f"balance.bias_rule must be one of {BIAS_RULES}, got {rule!r}")
  delta = jnp.where(mean_L1 > 0, delta, 0.0)
  return (bias_LE + rate * delta).astype(jnp.float32)


def max_violation(load_LE):
  """MaxVio per layer: (max_i load_i - mean load) / mean load."""
  load_LE = load_LE.astype(jnp.float32)
  mean_L = jnp.mean(load_LE, axis=-1)
  return (jnp.max(load_LE, axis=-1) - mean_L) / jnp.maximum(mean_L, 1e-9)
