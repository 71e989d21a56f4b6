"""Expert load balancing: the auxiliary-loss-free bias (LFB Alg. 1, V3 2.1.2), the
auxiliary losses it replaces, and MaxVio.

Everything here is a pure function of the MoEStats the model returns (leading dim L =
routed layers) and of the bias array [L, E]; the train step calls them explicitly.

The strategies (STRATEGIES below: each one's config settings, what it is in a line,
and its source) are the one list that configs/, the ablation's flags and its report read.

For every loss f_i = E / (K T) * (tokens routed to i by plain top-K of the UNBIASED
scores), so the losses see the router itself, not the bias's correction of it. Every
loss is summed over the routed layers (MTP blocks included): each layer adds its own
alpha * L_layer, as Hugging Face's DeepSeek-V2 code and Megatron do.

Balance scope: the tokens whose loads a loss or a bias update counts (term_scopes):
  sequence  seq_aux, always: f_i and P_i per sequence, averaged over sequences
  micro     balance.count_scope="micro": aux and batch_aux take f_i from each
            micro-batch (accumulation step) alone; the bias (sign, magnitude, quantile)
            moves after every micro-batch, from its loads
  global    balance.count_scope="global" (default): f_i from the whole step's counts
            (all micro-batches; Qwen arXiv 2501.11873), one bias update from the whole
            step's loads (QB: the mean of the micro-batches' targets, as Megatron)
With one micro-batch a step, micro and global count the same tokens. Data shards are
not a scope of their own: under data parallelism the step's counts are all-reduced
over the batch shards, so every scope above already spans them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax.model.moe import MoEStats

BIAS_RULES = ("sign", "magnitude", "quantile")
COUNT_SCOPES = ("global", "micro")


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A balancing strategy: the run-config fields it sets (dotted paths; "model." fields
  are ModelConfig's), what it is in one line, and where it comes from."""
  name: str
  settings: dict
  description: str
  source: str = ""

  @property
  def definition(self) -> str:
    """The line the README and the report print for it."""
    return f"{self.description} ({self.source})" if self.source else self.description


# LFB's alphas and rate: 1e-3; V3's combination adds the sequence-wise loss at 1e-4 to
# the bias. The *_micro pair differs from its global-counting twin only with
# microbatches > 1 (the Balance scope paragraph above).
STRATEGIES = {s.name: s for s in (
    Strategy("none", {}, "no load balancing"),
    Strategy("aux", {"balance.aux_alpha": 1e-3},
             "the classic auxiliary loss alpha * sum_i f_i P_i over the batch (P_i the mean "
             "raw affinity), summed over MoE layers; alpha (1e-3) is its weight",
             "Switch/GShard; LFB's baseline"),
    Strategy("seq_aux", {"balance.seq_aux_alpha": 1e-3},
             "the sequence-wise loss: f_i and P_i per sequence on the normalised "
             "affinities, averaged over sequences, alpha 1e-3", "DeepSeek-V3 eqs 17-20"),
    Strategy("batch_aux", {"balance.batch_aux_alpha": 1e-3},
             "the sequence-wise loss's statistics over the whole batch, alpha 1e-3",
             "DeepSeek-V3 4.5.3; Qwen's global-batch loss"),
    Strategy("bias", {"balance.bias_rate": 1e-3},
             "a per-expert bias added to the scores for choosing experts only, moved by "
             "u * sign(mean load - load) after every step, u = 1e-3",
             "Loss-Free Balancing, LFB: Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3's "
             "method"),
    Strategy("bias_seq_aux", {"balance.bias_rate": 1e-3, "balance.seq_aux_alpha": 1e-4},
             "the bias plus the sequence-wise loss at alpha 1e-4", "DeepSeek-V3 2.1.2"),
    Strategy("bias_magnitude", {"balance.bias_rate": 1e-3, "balance.bias_rule": "magnitude"},
             "the bias moved by u * (mean load - load) / mean load instead of the sign",
             "LFB's update-rule variant"),
    Strategy("bias_mult", {"balance.bias_rate": 1e-3, "model.bias_mode": "mul"},
             "the bias used multiplicatively: top-K of s_i * b_i, b starting at 1, moved by "
             "the sign rule", "LFB's bias-use variant"),
    Strategy("bias_freeze", {"balance.bias_rate": 1e-3, "balance.bias_freeze_frac": 0.97},
             "the sign-rule bias, frozen (u = 0) for the last 3% of training",
             "DeepSeek-V3 4.2: u 1e-3 for 14.3T of 14.8T tokens, then 0"),
    # u = 1: the bias is replaced by each step's target.
    Strategy("quantile", {"balance.bias_rule": "quantile", "balance.bias_rate": 1.0,
                          "model.quantile_stats": True},
             "the bias set each step to the per-expert score quantile at which every "
             "expert gets its share", "Quantile Balancing, QB: Su; Megatron PR #5349, Marin"),
    Strategy("batch_aux_micro", {"balance.batch_aux_alpha": 1e-3,
                                 "balance.count_scope": "micro"},
             "batch_aux with f_i counted per micro-batch", "Qwen, arXiv 2501.11873"),
    Strategy("bias_micro", {"balance.bias_rate": 1e-3, "balance.count_scope": "micro"},
             "the bias moved after every micro-batch from its own loads",
             "Qwen, arXiv 2501.11873"),
)}


def strategy(name: str) -> Strategy:
  """STRATEGIES[name], or a ValueError naming the known ones."""
  if name not in STRATEGIES:
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
  return STRATEGIES[name]


def term_scopes(balance, microbatches: int) -> dict:
  """{active balancing term: the scope it counts over} for a config's balance section:
  "sequence", "micro" or "global" (micro with one micro-batch a step reads "global")."""
  scope = balance.get("count_scope", "global") if microbatches > 1 else "global"
  out = {}
  for name in ("aux", "batch_aux"):
    if balance.get(f"{name}_alpha"):
      out[name] = scope
  if balance.get("seq_aux_alpha"):
    out["seq_aux"] = "sequence"
  if balance.get("bias_rate"):
    out[f"bias_{balance.get('bias_rule', 'sign')}"] = scope
  return out


def _load_fraction(count_E, n_tokens, top_k):
  """f_i of V3 eq 18: E / K times the fraction of the tokens routed to expert i (1 when
  balanced)."""
  E = count_E.shape[-1]
  return E / top_k * count_E / jnp.maximum(n_tokens, 1.0)[..., None]


def seq_aux_loss(stats: MoEStats, top_k: int):
  """V3 eqs 17-20 (alpha not applied): per layer the mean over sequences of
  sum_i f_i P_i, SUMMED over the routed layers (each layer adds its own alpha * L, as
  HF's DeepSeek-V2 code and Megatron do; SPEC 3). A layer that routed nothing adds 0."""
  n_LB = stats.n_tokens_B
  f_LBE = _load_fraction(stats.aux_count_BE, n_LB, top_k)
  p_LBE = stats.aux_prob_BE / jnp.maximum(n_LB, 1.0)[..., None]
  per_seq_LB = jnp.sum(f_LBE * p_LBE, axis=-1)
  has_tokens_LB = (n_LB > 0).astype(jnp.float32)
  per_layer_L = (jnp.sum(per_seq_LB * has_tokens_LB, axis=-1)
                 / jnp.maximum(has_tokens_LB.sum(-1), 1.0))
  return jnp.sum(per_layer_L)


def batch_counts(stats: MoEStats):
  """(routing-map counts [L, E], valid tokens [L]) of the batch: what f_i is made of."""
  return stats.aux_count_BE.sum(-2), stats.n_tokens_B.sum(-1)


def batch_aux_loss(stats: MoEStats, top_k: int, raw_scores: bool = False, counts=None):
  """sum_i f_i P_i over the whole batch per layer, SUMMED over the routed layers (alpha
  not applied).

  raw_scores=False: P_i = mean normalised affinity (V3's batch-wise loss);
  raw_scores=True:  P_i = mean raw affinity s_i (the classic loss of the LFB baseline).
  counts: (count_LE, n_L) to take f_i from instead of this batch's (the global batch's
  counts under gradient accumulation; f carries no gradient either way).
  """
  n_L = stats.n_tokens_B.sum(-1)
  count_LE, n_f_L = batch_counts(stats) if counts is None else counts
  f_LE = _load_fraction(count_LE, n_f_L, top_k)
  prob_BE = stats.aux_score_BE if raw_scores else stats.aux_prob_BE
  p_LE = prob_BE.sum(-2) / jnp.maximum(n_L, 1.0)[..., None]
  return jnp.sum(f_LE * p_LE)


LOSSES = ("aux", "seq_aux", "batch_aux")


def balance_terms(stats: MoEStats, top_k: int, counts=None):
  """The three balance losses WITHOUT their alphas: {"aux", "seq_aux", "batch_aux"}.

  All three are cheap, so the train step always computes them (every run logs what each
  loss would read) and weights them by runtime alphas: strategies differ in numbers
  only, and share one compiled step. counts: see batch_aux_loss.
  """
  return {"aux": batch_aux_loss(stats, top_k, raw_scores=True, counts=counts),
          "seq_aux": seq_aux_loss(stats, top_k),
          "batch_aux": batch_aux_loss(stats, top_k, counts=counts)}


def update_bias(bias_LE, load_LE, rate, rule: str = "sign", target_LE=None):
  """One step of the aux-loss-free update from a step's GLOBAL per-expert loads.

  sign:       b_i += u * sign(mean_load - load_i)           (LFB Alg. 1, V3)
  magnitude:  b_i += u * (mean_load - load_i) / mean_load   (LFB's variant; the error is
              taken relative to the mean so u keeps its meaning at any batch size)
  quantile:   b <- b + u * (target - b), re-centred         (QB; target_LE from MoEStats
              .quantile_target_E; u = 1 replaces the bias, Megatron's default)
  A layer that routed nothing this step (e.g. MTP skipped) is left unchanged.
  """
  load_LE = load_LE.astype(jnp.float32)
  mean_L1 = jnp.mean(load_LE, axis=-1, keepdims=True)
  if rule == "quantile":
    if target_LE is None:
      raise ValueError("balance.bias_rule='quantile' needs model.quantile_stats=True")
    new_LE = bias_LE + rate * (target_LE.astype(jnp.float32) - bias_LE)
    new_LE = new_LE - jnp.mean(new_LE, axis=-1, keepdims=True)
    return jnp.where(mean_L1 > 0, new_LE, bias_LE).astype(jnp.float32)
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
