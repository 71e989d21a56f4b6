"""Rounds of an expert-parallel exchange, summed in a loop of traced length with a
written-out backward: what keeps an exchange dropless with one round's memory when a
routing overflows its buffers (padded_exchange.py and ragged_exchange.py both send their
overflow this way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.model import dispatch


def _typed_like(w, x):
  """w made to vary over the manual axes x varies over (the implicit broadcast JAX
  inserts when the two meet), so that a weight gradient can be summed over rounds before
  the one psum over the token axes (dispatch.sum_to_type)."""
  extra = dispatch.varying_axes(x) - dispatch.varying_axes(w)
  return jax.lax.pcast(w, tuple(sorted(extra)), to="varying") if extra else w


def summed_rounds(round_fn, first: int = 0, scope: str | None = None):
  """f(diff, static, n_rounds) = sum_{first <= r < n_rounds} round_fn(r, *diff, *static),
  n_rounds traced (the same on every shard). diff: float arrays, the first one varying
  over the token axes, its shape and dtype the result's; static: integer arrays. XLA
  cannot differentiate a loop with a traced trip count, so the backward is written out:
  a second loop that recomputes each round's forward and pulls the cotangent back
  through it (jax.vjp), accumulating every diff gradient in float32 (weight gradients
  summed over the token axes once, at the end); memory stays one round's, the price one
  more forward of the rounds. scope: a name for both loops (jax.named_scope; the compile
  report finds the overflow rounds by it)."""

  def loop(body, init, n):
    if scope is None:
      return jax.lax.fori_loop(first, n, body, init)
    with jax.named_scope(scope):
      return jax.lax.fori_loop(first, n, body, init)

  def typed(diff):
    return (diff[0],) + tuple(_typed_like(d, diff[0]) for d in diff[1:])

  @jax.custom_vjp
  def summed(diff, static, n_rounds):
    return fwd(diff, static, n_rounds)[0]

  def fwd(diff, static, n_rounds):
    ds = typed(diff)
    x = ds[0]
    body = lambda r, y: y + round_fn(r, *ds, *static).astype(y.dtype)
    y = loop(body, dispatch.zeros_like_all(x.shape, x.dtype, *ds), n_rounds)
    return y, (diff, static, n_rounds)

  def bwd(res, dy):
    diff, static, n_rounds = res
    primals = typed(diff)

    def body(r, acc):
      _, pull = jax.vjp(lambda *p: round_fn(r, *p, *static), *primals)
      return tuple(a + d.astype(a.dtype) for a, d in zip(acc, pull(dy)))

    init = tuple(dispatch.zeros_like_all(p.shape, jnp.float32, p) for p in primals)
    acc = loop(body, init, n_rounds)
    grads = (acc[0].astype(diff[0].dtype),) + tuple(
        dispatch.sum_to_type(g, d) for g, d in zip(acc[1:], diff[1:]))
    return grads, tuple(None for _ in static), None

  summed.defvjp(fwd, bwd)
  return summed
