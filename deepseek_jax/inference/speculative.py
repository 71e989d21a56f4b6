"""Speculative decoding with the MTP modules as drafters (V3 Sec. 2.2, 5.4.3).

Notation: n = tokens the main model has cached (its cache length); t[n] the pending
token (chosen, not yet run); D = mtp_depth. Module k at position i reads h_{k-1}[i] and
token t[i+k] and predicts t[i+k+1], exactly as in training (model/mtp.py), so from position
n-1 the chain k = 1..D drafts t[n+1] .. t[n+D]: module k reads the draft of module k-1.

One round (a single jitted function, static shapes):
  draft   every module runs over a window of positions [m, n-1] of its own KV cache
          (the D modules share one length m); the window ends at n-1, where the drafts
          come from. Positions past the last round's commit point are recomputed, since
          they read tokens that were drafts then.
  verify  one main-model pass over [t[n], d_1 .. d_D] (D+1 positions) gives the target
          logits after each draft; the longest agreeing prefix (a drafts) is accepted and
          the main model's own token after it is appended: a+1 new tokens per round.
  rollback the main cache keeps n+a+1 entries, the MTP caches max(m, n-D+1) (module k at
          position j read t[j+k], committed iff j+k <= n): lengths only, nothing moves.

The window [m, n-1] then holds at most W = 2D positions (D-1 carried over + up to D+1
new). The modules need the main model's h_0 and the tokens over the window, so the state
keeps the last W of each in small sliding buffers (right-aligned, [B, W, D] and [B, W]).
Memory per token: main cache n_layers x (R+P) values plus MTP caches D x (R+P): one MTP
block per module, each with its own latent cache.

In array names K counts drafts (K = D; the alphabet's D is d_model) and W the window.

Greedy output equals plain greedy decoding token for token (every emitted token is the
main model's argmax given the committed prefix); sampling uses the speculative
acceptance rule (sampling.py), which keeps the main model's distribution.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from deepseek_jax.model import kv_cache
from deepseek_jax.inference.decoding import (Generation, StreamedRows, at_index, compile_loop,
                                             pad_prompts)
from deepseek_jax.model.kv_cache import KVCache
from deepseek_jax.model.transformer import BALANCE, Transformer
from deepseek_jax.inference.sampling import (Sampling, probabilities, sample,
                                             speculative_accept, split_rng)


@struct.dataclass
class SpecState:
  cache: KVCache        # main model: n = cache.lengths
  mtp_cache: KVCache    # D layers, one per module; m = mtp_cache.lengths
  token: jax.Array      # [B] t[n], pending
  h_buf: jax.Array      # [B, W, D] h_0 (as module 1 reads it) at positions n-W .. n-1
  tok_buf: jax.Array    # [B, W] tokens at positions n-W+1 .. n
  rng: jax.Array


def with_draft_depth(model: Transformer, variables, depth: int):
  """The model drafting `depth` tokens a round: with fewer MTP modules than it has, the
  first `depth` (and their bias rows); with more, modules past the last trained one
  reuse its weights and balancing bias (chained drafts, as SGLang serves V3's single
  MTP module for several draft steps). Each module k keeps its own cache layer, since
  the hidden states it reads differ."""
  cfg = model.cfg
  if depth < 1 or cfg.mtp_depth < 1:
    raise ValueError(f"speculative decoding needs MTP modules and a draft depth >= 1; the "
                     f"model has mtp_depth {cfg.mtp_depth}, the draft depth is {depth}")
  if depth == cfg.mtp_depth:
    return model, variables
  trained = cfg.mtp_depth
  params = {k: v for k, v in variables["params"].items()
            if not (k.startswith("mtp_") and int(k[4:]) >= depth)}
  for k in range(trained, depth):
    params[f"mtp_{k}"] = variables["params"][f"mtp_{trained - 1}"]
  out = {**variables, "params": params}
  if BALANCE in variables and cfg.mtp_is_moe:
    bias_LE = variables[BALANCE]["expert_bias"]
    rows = [bias_LE[:cfg.n_moe_layers + min(depth, trained)]]
    rows += [bias_LE[cfg.n_moe_layers + trained - 1:][:1]] * max(depth - trained, 0)
    out[BALANCE] = {"expert_bias": jnp.concatenate(rows, axis=0)}
  return Transformer(cfg.replace(mtp_depth=depth)), out


def window(cfg) -> int:
  return 2 * cfg.mtp_depth


def _take_rows(x_BQ, start_B, width: int):
  """x[b, start[b] : start[b] + width] (indices clipped into range)."""
  idx_BW = jnp.clip(start_B[:, None] + jnp.arange(width), 0, x_BQ.shape[1] - 1)
  return jnp.take_along_axis(x_BQ, idx_BW.reshape(idx_BW.shape + (1,) * (x_BQ.ndim - 2)),
                             axis=1)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_len", "absorb",
                                             "cache_dtype"))
def spec_prefill(variables, tokens_BT, lengths_B, rng, *, model: Transformer,
                 sampling: Sampling, max_len: int, absorb: bool = True, cache_dtype=None):
  """Main prefill, first token, and the MTP caches over the prompt's committed positions,
  into fresh dense caches of max_len."""
  cfg = model.cfg
  B = tokens_BT.shape[0]
  return prefill_into(variables, tokens_BT, lengths_B, rng,
                      kv_cache.create(cfg, cfg.n_layers, B, max_len, cache_dtype),
                      kv_cache.create(cfg, cfg.mtp_depth, B, max_len, cache_dtype),
                      model=model, sampling=sampling, absorb=absorb)


def prefill_into(variables, tokens_BT, lengths_B, rng, cache, mtp_cache, *,
                 model: Transformer, sampling: Sampling, absorb: bool = True) -> SpecState:
  """spec_prefill's work on given empty caches (dense, or a paged cache's rows)."""
  cfg = model.cfg
  D, W = cfg.mtp_depth, window(cfg)
  B, T = tokens_BT.shape
  out, cache = model.apply(variables, tokens_BT, cache, lengths_B, absorb=absorb,
                           method=Transformer.extend)
  rng, sub = jax.random.split(rng)
  first_B = sample(sub, at_index(out.logits, lengths_B - 1), sampling)
  # Tokens with t[n] = first appended at each row's length; D spare columns for i+k.
  ext_BT = jnp.concatenate([tokens_BT, jnp.zeros((B, D + 1), jnp.int32)], axis=1)
  ext_BT = ext_BT.at[jnp.arange(B), lengths_B].set(first_B)

  # Module k at position j reads t[j+k]: committed for j <= n-D. Keep position n-1 out
  # of the cache either way, so the first round's window is never empty.
  m_B = jnp.maximum(jnp.minimum(lengths_B - D + 1, lengths_B - 1), 0)
  mtp_cache = mtp_cache.with_lengths(jnp.zeros_like(m_B))
  h_BTD = out.hidden
  for k in range(1, D + 1):
    o, mtp_cache = model.apply(variables, k, h_BTD, ext_BT[:, k:k + T], mtp_cache, m_B,
                               absorb=absorb, method=Transformer.mtp_extend)
    h_BTD = o.hidden
  mtp_cache = mtp_cache.with_lengths(m_B)

  h_pad = jnp.concatenate([jnp.zeros((B, W, cfg.d_model), out.hidden.dtype), out.hidden], 1)
  tok_pad = jnp.concatenate([jnp.zeros((B, W), jnp.int32), ext_BT], 1)
  # h_0 at positions n-W .. n-1 and tokens at n-W+1 .. n (the pads stand for i < 0).
  return SpecState(cache=cache, mtp_cache=mtp_cache, token=first_B,
                   h_buf=_take_rows(h_pad, lengths_B, W),
                   tok_buf=_take_rows(tok_pad, lengths_B + 1, W), rng=rng)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "absorb"),
                   donate_argnums=(1,))
def spec_round(variables, state: SpecState, *, model: Transformer, sampling: Sampling,
               absorb: bool = True):
  """One draft + verify round. Returns (state, emitted [B, D+1], n_emitted [B], drafts
  [B, D]); emitted row b holds n_emitted[b] = accepted + 1 tokens, then -1."""
  cfg = model.cfg
  D, W = cfg.mtp_depth, window(cfg)
  B = state.token.shape[0]
  rows = jnp.arange(B)
  n_B, m_B = state.cache.lengths, state.mtp_cache.lengths
  c_B = n_B - m_B                       # window length, 1 .. W
  rng, rng_draft, rng_accept = split_rng(state.rng, 3, sampling)

  # Draft -----------------------------------------------------------------------------
  # Window index i is position m+i: h_buf index W-c+i; its next token (position m+i+1)
  # tok_buf index W-c+i. Drafts d_k (position n+k) go to index c-1+k of the token row.
  h_BWD = _take_rows(state.h_buf, W - c_B, W)
  tok_row = jnp.concatenate([_take_rows(state.tok_buf, W - c_B, W),
                             jnp.zeros((B, D), jnp.int32)], axis=1)
  mtp_cache, drafts, draft_probs = state.mtp_cache, [], []
  for k in range(1, D + 1):
    o, mtp_cache = model.apply(variables, k, h_BWD, tok_row[:, k - 1:k - 1 + W], mtp_cache,
                               c_B, absorb=absorb, method=Transformer.mtp_extend)
    logits_BV = at_index(o.logits, c_B - 1)        # position n-1 predicts t[n+k]
    d_B = sample(jax.random.fold_in(rng_draft, k), logits_BV, sampling)
    tok_row = tok_row.at[rows, c_B - 1 + k].set(d_B)
    drafts.append(d_B)
    if not sampling.greedy:
      draft_probs.append(probabilities(logits_BV, sampling))
    h_BWD = o.hidden
  drafts_BK = jnp.stack(drafts, axis=1)
  draft_probs_BKV = jnp.stack(draft_probs, axis=1) if draft_probs else None
  mtp_cache = mtp_cache.with_lengths(jnp.maximum(m_B, n_B - D + 1))

  # Verify ------------------------------------------------------------------------------
  chunk_BK1 = jnp.concatenate([state.token[:, None], drafts_BK], axis=1)
  out, cache = model.apply(variables, chunk_BK1, state.cache, absorb=absorb,
                           method=Transformer.extend)
  a_B, next_B = speculative_accept(rng_accept, drafts_BK, draft_probs_BKV, out.logits,
                                   sampling)
  cache = cache.with_lengths(n_B + a_B + 1)      # rollback: drop the rejected drafts

  i_K1 = jnp.arange(D + 1)[None, :]
  drafts_pad = jnp.concatenate([drafts_BK, jnp.zeros((B, 1), jnp.int32)], axis=1)
  emitted_BK1 = jnp.where(i_K1 < a_B[:, None], drafts_pad,
                          jnp.where(i_K1 == a_B[:, None], next_B[:, None], -1))
  # Slide the buffers by the a+1 committed positions.
  h_buf = _take_rows(jnp.concatenate([state.h_buf, out.hidden], 1), a_B + 1, W)
  tok_buf = _take_rows(jnp.concatenate([state.tok_buf, emitted_BK1], 1), a_B + 1, W)
  new = SpecState(cache=cache, mtp_cache=mtp_cache, token=next_B, h_buf=h_buf,
                  tok_buf=tok_buf, rng=rng)
  return new, emitted_BK1, a_B + 1, drafts_BK


def speculative_generate(model: Transformer, variables, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int, sampling: Sampling = Sampling(), *,
                         seed: int = 0, absorb: bool = True, cache_dtype=None,
                         eos_id: int | None = None,
                         on_tokens: Callable[[list[list[int]]], None] | None = None,
                         max_len: int | None = None) -> Generation:
  """decoding.generate with MTP drafts. Extra stats, over (row, round) pairs of rows still
  generating: row_rounds_reaching_depth[k] = pairs with >= k drafts accepted;
  acceptance_per_depth[k-1] = P(draft k accepted | drafts 1..k-1 accepted);
  accepted_fraction = accepted drafts / drafted; tokens_per_round."""
  cfg = model.cfg
  if cfg.mtp_depth < 1:
    raise ValueError("speculative decoding needs MTP modules (mtp_depth >= 1)")
  D = cfg.mtp_depth
  tokens_BT, lengths_B = pad_prompts(prompts)
  # A round may write D+1 entries past the last kept token.
  max_len = max_len or tokens_BT.shape[1] + max_new_tokens + D + 1
  static = dict(model=model, sampling=sampling, absorb=absorb)
  rng = jax.random.PRNGKey(seed)

  pre, step, compile_s = compile_loop(spec_prefill, spec_round, variables, tokens_BT,
                                      lengths_B, rng, max_len, cache_dtype, static)

  rows = StreamedRows(len(prompts), max_new_tokens, eos_id, on_tokens)
  t0 = time.perf_counter()
  state = pre(variables, tokens_BT, lengths_B, rng)
  rows.add(np.asarray(state.token)[:, None])
  prefill_s = time.perf_counter() - t0

  # Per round, the emitted count of every row still generating (accepted drafts + 1);
  # the statistics are computed once at the end: the loop's host work per round is one
  # transfer and a few list operations, which on a small model is a visible share of
  # a round.
  counts_per_round: list[list[int]] = []
  t0, pending = time.perf_counter(), None
  # As in decoding.generate: round r+1 is dispatched before round r's tokens are pulled.
  while not rows.all_done or pending is not None:
    nxt = step(variables, state) if not rows.all_done else None
    if nxt is not None:
      state = nxt[0]
    if pending is not None:
      # One transfer per round; a row's tokens end where the -1 padding starts.
      new_rows = [[t for t in row if t >= 0] for row in np.asarray(pending).tolist()]
      counts_per_round.append([len(r) for r, done in zip(new_rows, rows.done) if not done])
      rows.add(new_rows)
    pending = nxt[1] if nxt is not None else None
  decode_s = time.perf_counter() - t0
  n_rounds = sum(1 for c in counts_per_round if c)
  accepted = np.asarray([n - 1 for c in counts_per_round for n in c], np.int64)
  reached = (accepted[:, None] >= np.arange(D + 1)).sum(0)   # rounds with >= k accepted

  acceptance = [float(reached[k] / reached[k - 1]) if reached[k - 1] else float("nan")
                for k in range(1, D + 1)]
  drafted = reached[0] * D
  extra = {"rounds": n_rounds, "row_rounds_reaching_depth": reached.tolist(),
           "acceptance_per_depth": [round(x, 4) for x in acceptance],
           "accepted_fraction": float(reached[1:].sum() / drafted) if drafted else float("nan"),
           "tokens_per_round": float(reached[1:].sum() / reached[0] + 1) if reached[0] else 0.0}
  return Generation(tokens=rows.out, prefill_s=prefill_s, decode_s=decode_s,
                    compile_s=compile_s, decode_tokens=rows.n_after_first,
                    cache_bytes=state.cache.nbytes + state.mtp_cache.nbytes,
                    cache_values_per_token=(state.cache.values_per_token
                                            + state.mtp_cache.values_per_token),
                    extra=extra)
