"""Choosing tokens from logits: greedy, temperature, top-k, top-p, and the speculative
acceptance rule (Leviathan et al. 2023; Chen et al. 2023) that keeps sampling exact.

`Sampling` is static (a jit argument that recompiles), so greedy decoding compiles to a
plain argmax with no random numbers anywhere.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0   # 0: greedy (argmax)
  top_k: int = 0             # keep the k most likely tokens; 0: all
  top_p: float = 1.0         # keep the smallest set of mass >= top_p; 1: all

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"bad sampling settings {self}: need temperature >= 0, top_k >= 0, "
                       "0 < top_p <= 1")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filtered_logits(logits_BV, s: Sampling):
  """float32 logits / temperature, with tokens outside top-k and top-p set to -inf."""
  x_BV = logits_BV.astype(jnp.float32) / s.temperature
  if s.top_k and s.top_k < x_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(x_BV, s.top_k)[0][..., -1:]
    x_BV = jnp.where(x_BV < kth_B1, -jnp.inf, x_BV)
  if s.top_p < 1.0:
    sorted_BV = jnp.flip(jnp.sort(x_BV, axis=-1), axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token is kept if the mass strictly before it is < top_p: the top token always is.
    keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < s.top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    x_BV = jnp.where(x_BV < cutoff_B1, -jnp.inf, x_BV)
  return x_BV


def probabilities(logits_BV, s: Sampling):
  """The distribution tokens are drawn from (one-hot at the argmax when greedy)."""
  if s.greedy:
    return jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filtered_logits(logits_BV, s), axis=-1)


def split_rng(rng, n: int, s: Sampling):
  """jax.random.split(rng, n), or n copies of rng when greedy: greedy decoding draws
  nothing, and on a small model the split's ops are a measurable part of a step."""
  if s.greedy:
    return [rng] * n
  return list(jax.random.split(rng, n))


def sample(rng, logits_BV, s: Sampling):
  """[B] int32 tokens."""
  if s.greedy:
    return jnp.argmax(logits_BV, -1).astype(jnp.int32)
  return jax.random.categorical(rng, filtered_logits(logits_BV, s), axis=-1).astype(jnp.int32)


def speculative_accept(rng, drafts_BK, draft_probs_BKV, target_logits_BK1V, s: Sampling):
  """Verifies K drafted tokens against the target model's K+1 next-token logits.

  target_logits[:, i] is the target's prediction for the token after draft i (i = 0: after
  the last committed token); draft_probs[:, i] the distribution draft i was drawn from.
  Returns (n_accepted [B], next [B]): drafts 0..n-1 are kept and `next` follows them.

  Greedy: a draft is kept iff it equals the target's argmax, and `next` is the argmax after
  the kept prefix, so the output is exactly plain greedy decoding's. Sampling: draft i is
  kept with probability min(1, p(d)/q(d)); at the first rejection `next` is drawn from
  norm(max(0, p - q)), after K acceptances from p: the output is distributed exactly as
  sampling from the target alone.
  """
  B, K = drafts_BK.shape
  rows = jnp.arange(B)
  if s.greedy:
    target_BK1 = jnp.argmax(target_logits_BK1V, -1).astype(jnp.int32)
    ok_BK = drafts_BK == target_BK1[:, :K]
    n_B = jnp.sum(jnp.cumprod(ok_BK, axis=-1), axis=-1)
    return n_B, target_BK1[rows, n_B]
  p_BK1V = jax.nn.softmax(filtered_logits(target_logits_BK1V, s), axis=-1)
  p_d_BK = jnp.take_along_axis(p_BK1V[:, :K], drafts_BK[..., None], -1)[..., 0]
  q_d_BK = jnp.take_along_axis(draft_probs_BKV, drafts_BK[..., None], -1)[..., 0]
  rng_u, rng_next = jax.random.split(rng)
  u_BK = jax.random.uniform(rng_u, (B, K))
  ok_BK = u_BK * q_d_BK < p_d_BK          # u < p/q without dividing by a small q
  n_B = jnp.sum(jnp.cumprod(ok_BK, axis=-1), axis=-1)
  q_pad_BK1V = jnp.concatenate([draft_probs_BKV, jnp.zeros_like(p_BK1V[:, :1])], axis=1)
  residual_BV = jnp.maximum(p_BK1V[rows, n_B] - q_pad_BK1V[rows, n_B], 0.0)
  # A rejection implies p(d) < q(d), hence mass elsewhere; the guard is for rounding.
  total_B1 = residual_BV.sum(-1, keepdims=True)
  residual_BV = jnp.where(total_B1 > 0, residual_BV, p_BK1V[rows, n_B])
  nxt_B = jax.random.categorical(rng_next, jnp.log(residual_BV), axis=-1).astype(jnp.int32)
  return n_B, nxt_B
