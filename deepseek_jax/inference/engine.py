"""Continuous batching over the paged latent cache: many requests, a fixed set of slots.

The engine holds `slots` rows of a PagedCache and a queue of requests. Each turn of its
loop it admits waiting requests into free slots (one prefill call for the requests
admitted together: the model runs each prompt against the shared page pool through its
row's own page table, so the running slots pay nothing), then advances every running slot by one call of a compiled
program that runs batched steps in a device loop until a running request ends (its
budget or an eos; steps_per_call at most), so that the host neither dispatches nor waits
per step (on a small model a dispatch costs more than the step: BUILD_NOTES, Decoding). A
request that reaches its token budget or eos gives its pages back and its slot to the
next request in the queue. Pages are reserved at admission for the prompt and the token
budget, so a running request never waits for memory; a request waits in the queue while
too few pages are free.

A step is either a plain decode step (one token a slot) or, with `speculative=True`,
one MTP speculation round (speculative_lib.spec_round: the modules draft, the main model
verifies the drafts, the longest agreeing prefix and the main model's next token are
accepted: 1 .. D+1 tokens a slot). The MTP modules' caches live in a second pool of D
layers addressed by the same page tables (a module's position j sits where the main
model's does).

Greedy output equals the same request decoded alone (tests/inference/test_engine.py):
every row of a step is computed independently of the others, and an idle row (no
request) writes nothing, since its table owns no page.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.inference import speculative as speculative_lib
from deepseek_jax.inference.decoding import PAD_MULTIPLE, at_index
from deepseek_jax.inference.sampling import Sampling, sample, split_rng
from deepseek_jax.model import paged_cache
from deepseek_jax.model.transformer import Transformer


@dataclasses.dataclass
class Served:
  tokens: list[list[int]]     # completion ids per request, in input order
  wall_s: float               # the loop, from the first admission to the last token
  compile_s: float
  steps: int                  # batched decode steps (speculative: rounds)
  calls: int                  # device programs that ran them (steps_per_call at most)
  prefills: int
  peak_pages: int             # most pages held at once
  n_pages: int
  page_size: int
  cache_bytes: int            # the page pools (the MTP modules' included)
  bytes_per_token_layer: int  # one position of one layer in the pool
  slot_steps: int = 0         # (slot, step) pairs of running requests
  emitted: int = 0            # tokens those produced (kept or cut at the budget)
  mtp_depth: int = 0          # drafts a round (0: plain decoding)

  @property
  def tokens_per_s(self) -> float:
    n = sum(map(len, self.tokens))
    return n / self.wall_s if self.wall_s > 0 else float("nan")

  @property
  def acceptance(self) -> float:
    """Accepted drafts / drafted, over the rounds of running requests."""
    drafted = self.slot_steps * self.mtp_depth
    return (self.emitted - self.slot_steps) / drafted if drafted else float("nan")

  def summary(self) -> str:
    spec = ""
    if self.mtp_depth:
      spec = (f"; speculative: {self.emitted / max(self.slot_steps, 1):.2f} tokens a round, "
              f"acceptance {self.acceptance:.3f} of {self.mtp_depth} draft(s)")
    return (f"{len(self.tokens)} requests, {sum(map(len, self.tokens))} tokens in "
            f"{self.wall_s:.2f} s: {self.tokens_per_s:.1f} tok/s; {self.steps} batched "
            f"steps in {self.calls} calls, {self.prefills} prefills; cache peak "
            f"{self.peak_pages}/{self.n_pages} pages of {self.page_size} "
            f"({self.cache_bytes / 2**20:.2f} MiB pool, "
            f"{self.bytes_per_token_layer} bytes a token a layer); "
            f"compile {self.compile_s:.1f} s{spec}")


# Plain decoding: one token a slot a step ----------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnums=(1,))
def _prefill(variables, state, pages_AJ, slots_A, tokens_AT, n_A, rng, *, model, sampling):
  """A requests' prompts (n_A tokens of each row real) into slots slots_A, each through
  its own page table: (state, first tokens [A]); state = (pools with every slot's
  length, each slot's pending token). A row whose slot is past the last (padding) owns
  no page and changes nothing."""
  cache, last_B = state
  rows = cache.rows(pages_AJ, jnp.zeros_like(n_A))
  out, rows = model.apply(variables, tokens_AT, rows, n_A, method=Transformer.extend)
  token_A = sample(rng, at_index(out.logits, n_A - 1), sampling)
  cache = rows.rows(cache.pages, cache.lengths.at[slots_A].set(n_A, mode="drop"))
  return (cache, last_B.at[slots_A].set(token_A, mode="drop")), token_A


def _step(variables, state, active_B, rng, *, model, sampling):
  """One token for every active slot (the others write and advance nothing):
  (state, next token [B])."""
  cache, last_B = state
  out, cache = model.apply(variables, last_B[:, None], cache, active_B,
                           method=Transformer.extend)
  token_B = sample(rng, out.logits[:, 0], sampling)
  return (cache, jnp.where(active_B > 0, token_B, last_B)), token_B


def _device_loop(step, state, outs, left_B, eos):
  """Runs step(state, i) -> (state, out_i, emitted [B], ended at an eos [B]) until a
  running slot has emitted its budget (left_B) or an eos, or `outs` (a pytree of
  [max_steps, ...] buffers, out_i into row i) is full: (state, outs, steps run). Idle
  slots have a budget no step reaches and end nothing."""
  max_steps = jax.tree.leaves(outs)[0].shape[0]

  def body(carry):
    i, state, outs, left_B, _ = carry
    state, out, n_B, at_eos_B = step(state, i)
    outs = jax.tree.map(lambda o, x: o.at[i].set(x), outs, out)
    left_B = left_B - n_B
    return i + 1, state, outs, left_B, jnp.any((left_B <= 0) | at_eos_B)
  i, state, outs, _, _ = jax.lax.while_loop(
      lambda carry: (carry[0] < max_steps) & ~carry[4], body,
      (jnp.int32(0), state, outs, left_B, jnp.bool_(False)))
  return state, outs, i


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_steps"),
                   donate_argnums=(1,))
def _steps(variables, state, pages_BJ, left_B, eos, rng, *, model, sampling, max_steps):
  """Decode steps of every slot that owns pages (a slot with none is idle: it writes and
  advances nothing) until one ends (_device_loop): (state, tokens [max_steps, B], -1
  past the steps run, steps run)."""
  cache, last_B = state
  active_B = (pages_BJ[:, 0] < cache.n_pages).astype(jnp.int32)

  def step(st, i):
    st, token_B = _step(variables, st, active_B,   # greedy draws nothing
                        rng if sampling.greedy else jax.random.fold_in(rng, i),
                        model=model, sampling=sampling)
    return st, token_B, active_B, (token_B == eos) & (active_B > 0)
  tokens_NB = jnp.full((max_steps, last_B.shape[0]), -1, jnp.int32)
  return _device_loop(step, (cache.rows(pages_BJ, cache.lengths), last_B), tokens_NB,
                      left_B, eos)


class _PlainSlots:
  """The slots' device state for plain decoding: the pools (with each slot's length)
  and each slot's pending token; a step takes only the page table from the host."""
  extra_positions = 0

  def __init__(self, engine: "Engine", cache_dtype):
    cfg = engine.model.cfg
    self.engine = engine
    self.state = (paged_cache.create(cfg, cfg.n_layers, engine.n_pages, engine.page_size,
                                     engine.slots, engine.max_pages, cache_dtype),
                  jnp.zeros((engine.slots,), jnp.int32))

  def prefill(self, slots, pages_AJ, tokens_AT, n, rng) -> list[int]:
    args = (self.engine.variables, self.state, pages_AJ, slots, tokens_AT, n, rng)
    self.state, first = self.engine.compiled("prefill", _prefill, *args)(*args)
    return np.asarray(first).tolist()

  def run(self, table, left, eos, rng) -> list[list[list[int]]]:
    """Steps of the slots that own pages until one ends (left: each slot's budget, eos:
    -1 for none): per step run, per slot, its tokens."""
    args = (self.engine.variables, self.state, table, left, np.int32(eos), rng)
    self.state, tokens_NB, n = self.engine.compiled(
        "steps", _steps, *args, max_steps=self.engine.steps_per_call)(*args)
    return [[[t] for t in row] for row in np.asarray(tokens_NB)[:int(n)].tolist()]

  @property
  def pools(self):
    return [self.state[0]]


# Speculative decoding: an MTP round a step ----------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnums=(1,))
def _spec_prefill(variables, state, pages_AJ, slots_A, tokens_AT, n_A, rng, *, model,
                  sampling):
  """As _prefill, into the speculative state: (state, first tokens [A])."""
  zero = jnp.zeros_like(n_A)
  row = speculative_lib.prefill_into(variables, tokens_AT, n_A, rng,
                                     state.cache.rows(pages_AJ, zero),
                                     state.mtp_cache.rows(pages_AJ, zero),
                                     model=model, sampling=sampling)
  put = lambda whole, part: whole.at[slots_A].set(part, mode="drop")
  state = state.replace(
      cache=row.cache.rows(state.cache.pages, put(state.cache.lengths, row.cache.lengths)),
      mtp_cache=row.mtp_cache.rows(state.mtp_cache.pages,
                                   put(state.mtp_cache.lengths, row.mtp_cache.lengths)),
      token=put(state.token, row.token), h_buf=put(state.h_buf, row.h_buf),
      tok_buf=put(state.tok_buf, row.tok_buf))
  return state, row.token


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_steps"),
                   donate_argnums=(1,))
def _spec_steps(variables, state, pages_BJ, left_B, eos, *, model, sampling, max_steps):
  """Draft + verify + accept rounds of every slot (idle slots own no page: they write
  nothing) until one ends (_device_loop): (state, emitted [max_steps, B, D+1] (-1 past
  each row's count), counts [max_steps, B], rounds run)."""
  state = state.replace(cache=state.cache.rows(pages_BJ, state.cache.lengths),
                        mtp_cache=state.mtp_cache.rows(pages_BJ, state.mtp_cache.lengths))
  active_B = pages_BJ[:, 0] < state.cache.n_pages

  def step(st, i):
    del i   # a round draws from the state's rng
    st, emitted_BK1, n_B, _ = speculative_lib.spec_round(variables, st, model=model,
                                                         sampling=sampling)
    at_eos_B = jnp.any((emitted_BK1 == eos) & (emitted_BK1 >= 0), axis=1) & active_B
    return st, (emitted_BK1, n_B), jnp.where(active_B, n_B, 0), at_eos_B
  B, K1 = state.token.shape[0], model.cfg.mtp_depth + 1
  outs = (jnp.full((max_steps, B, K1), -1, jnp.int32), jnp.zeros((max_steps, B), jnp.int32))
  state, (emitted_NBK1, n_NB), rounds = _device_loop(step, state, outs, left_B, eos)
  return state, emitted_NBK1, n_NB, rounds


class _SpeculativeSlots:
  """The slots' device state for MTP speculation: a SpecState over the paged pools
  (main model: n_layers layers; MTP modules: mtp_depth layers, same page tables)."""

  def __init__(self, engine: "Engine", cache_dtype, seed: int):
    cfg = engine.model.cfg
    if cfg.mtp_depth < 1:
      raise ValueError("speculative serving needs MTP modules (this model's mtp_depth is "
                       "0): serve without --speculative")
    self.engine = engine
    # A round writes the pending token and D drafts past the last kept position.
    self.extra_positions = cfg.mtp_depth + 1
    args = (cfg, engine.n_pages, engine.page_size, engine.slots, engine.max_pages,
            cache_dtype)
    W = speculative_lib.window(cfg)
    self.state = speculative_lib.SpecState(
        cache=paged_cache.create(cfg, cfg.n_layers, *args[1:]),
        mtp_cache=paged_cache.create(cfg, cfg.mtp_depth, *args[1:]),
        token=jnp.zeros((engine.slots,), jnp.int32),
        h_buf=jnp.zeros((engine.slots, W, cfg.d_model), jnp.dtype(cfg.dtype)),
        tok_buf=jnp.zeros((engine.slots, W), jnp.int32),
        rng=jax.random.PRNGKey(seed + 1))

  def prefill(self, slots, pages_AJ, tokens_AT, n, rng) -> list[int]:
    args = (self.engine.variables, self.state, pages_AJ, slots, tokens_AT, n, rng)
    self.state, first = self.engine.compiled("spec_prefill", _spec_prefill, *args)(*args)
    return np.asarray(first).tolist()

  def run(self, table, left, eos, rng) -> list[list[list[int]]]:
    """Rounds of the slots that own pages until one ends (as _PlainSlots.run): per round
    run, per slot, its tokens."""
    del rng   # the rounds draw from the state's rng
    args = (self.engine.variables, self.state, table, left, np.int32(eos))
    self.state, emitted, counts, n = self.engine.compiled(
        "spec_steps", _spec_steps, *args, max_steps=self.engine.steps_per_call)(*args)
    n = int(n)
    return [[row[:c] for row, c in zip(rows, cs)]
            for rows, cs in zip(np.asarray(emitted)[:n].tolist(), np.asarray(counts)[:n])]

  @property
  def pools(self):
    return [self.state.cache, self.state.mtp_cache]


class Engine:
  """serve(prompts, max_new_tokens) -> Served. One compiled program for the slots'
  steps, one compiled prefill per row count (powers of two up to the slots) and
  prompt-length bucket (multiples of PAD_MULTIPLE)."""

  def __init__(self, model: Transformer, variables, *, slots: int, max_len: int,
               page_size: int = 16, n_pages: int | None = None,
               sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None,
               cache_dtype=None, speculative: bool = False, draft_depth: int | None = None,
               steps_per_call: int = 64):
    if min(slots, page_size, steps_per_call) < 1:
      raise ValueError(f"slots, page_size and steps_per_call must be >= 1; got {slots}, "
                       f"{page_size}, {steps_per_call}")
    if speculative:   # draft_depth past the trained modules chains the last one
      model, variables = speculative_lib.with_draft_depth(
          model, variables, draft_depth or model.cfg.mtp_depth)
    self.model, self.variables, self.sampling = model, variables, sampling
    self.slots, self.page_size, self.eos_id = slots, page_size, eos_id
    self.steps_per_call = steps_per_call
    extra = model.cfg.mtp_depth + 1 if speculative else 0
    self.max_pages = -(-(max_len + extra) // page_size)
    # Default pool: every slot at max_len (what a dense cache would hold).
    self.n_pages = n_pages or slots * self.max_pages
    self.rng = jax.random.PRNGKey(seed)
    self.compile_s = 0.0
    self._compiled = {}
    self.speculative = speculative
    self.slots_state = (_SpeculativeSlots(self, cache_dtype, seed) if speculative
                        else _PlainSlots(self, cache_dtype))

  def compiled(self, name, fn, *args, **static):
    """fn compiled ahead of time for these argument shapes (its compile time counted)."""
    key = (name,) + tuple(getattr(a, "shape", None) for a in args[2:])
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = fn.lower(*args, model=self.model, sampling=self.sampling,
                                     **static).compile()
      self.compile_s += time.perf_counter() - t0
    return self._compiled[key]

  def _pages_needed(self, prompts, max_new_tokens) -> list[int]:
    extra = self.slots_state.extra_positions
    need = [-(-(len(p) + max_new_tokens + extra) // self.page_size) for p in prompts]
    if min(map(len, prompts), default=1) < 1:
      raise ValueError("every prompt needs at least one token")
    if max(need, default=0) > min(self.max_pages, self.n_pages):
      raise ValueError(f"a prompt of {max(map(len, prompts))} tokens + {max_new_tokens} new "
                       f"needs {max(need)} pages of {self.page_size}; this engine has "
                       f"{min(self.max_pages, self.n_pages)} a row (raise max_len)")
    return need

  def _prefill(self, admitted, owner, prompts, table) -> list[int]:
    """The prompts of the requests just admitted to slots `admitted`, in one call: rows
    padded to a power of two (a padding row owns no page and names no slot, so it
    changes nothing), prompts to a multiple of PAD_MULTIPLE; each one's first token."""
    A = 1 << (len(admitted) - 1).bit_length()
    T = max(len(prompts[owner[slot]]) for slot in admitted)
    tokens = np.zeros((A, -(-T // PAD_MULTIPLE) * PAD_MULTIPLE), np.int32)
    n = np.ones((A,), np.int32)
    slots = np.full((A,), self.slots, np.int32)
    pages = np.full((A, self.max_pages), self.n_pages, np.int32)
    for i, slot in enumerate(admitted):
      p = prompts[owner[slot]]
      tokens[i, :len(p)], n[i], slots[i], pages[i] = p, len(p), slot, table[slot]
    self.rng, sub = jax.random.split(self.rng)
    return self.slots_state.prefill(slots, pages, tokens, n, sub)[:len(admitted)]

  def serve(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Served:
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    need = self._pages_needed(prompts, max_new_tokens)
    slots = self.slots_state
    free_pages = collections.deque(range(self.n_pages))
    table = np.full((self.slots, self.max_pages), self.n_pages, np.int32)
    owner = [None] * self.slots                 # request index per slot
    out = [[] for _ in prompts]
    queue = collections.deque(range(len(prompts)))
    steps = calls = prefills = peak = slot_steps = emitted = 0
    t0 = time.perf_counter()
    compile0 = self.compile_s

    def take(slot, new) -> None:
      """Appends a slot's new tokens up to the budget or eos; frees a finished slot."""
      r = owner[slot]
      for t in new:
        out[r].append(int(t))
        if len(out[r]) >= max_new_tokens or t == self.eos_id:
          for p in table[slot]:
            if p != self.n_pages:
              free_pages.append(int(p))
          table[slot], owner[slot] = self.n_pages, None
          return

    while queue or any(o is not None for o in owner):
      admitted = []                            # admit into free slots
      for slot in range(self.slots):
        if owner[slot] is not None or not queue or len(free_pages) < need[queue[0]]:
          continue
        r = owner[slot] = queue.popleft()
        table[slot, :need[r]] = [free_pages.popleft() for _ in range(need[r])]
        admitted.append(slot)
      if admitted:
        for slot, first in zip(admitted, self._prefill(admitted, owner, prompts, table)):
          take(slot, [first])
        prefills += len(admitted)
      peak = max(peak, self.n_pages - len(free_pages))
      if all(o is None for o in owner):
        continue
      # One call runs steps until a running request ends (its budget or an eos) or
      # steps_per_call have run; the host admits and frees between calls.
      left = np.full((self.slots,), 2 ** 30, np.int32)   # idle slots: never reached
      for slot, r in enumerate(owner):
        if r is not None:
          left[slot] = max_new_tokens - len(out[r])
      self.rng, sub = split_rng(self.rng, 2, self.sampling)
      owners = list(owner)
      per_step = slots.run(table, left, -1 if self.eos_id is None else self.eos_id, sub)
      steps, calls = steps + len(per_step), calls + 1
      for new in per_step:
        for slot, r in enumerate(owners):
          if r is not None and owner[slot] == r:   # running, and not ended this call
            slot_steps += 1
            emitted += len(new[slot])
            take(slot, new[slot])
    wall = time.perf_counter() - t0 - (self.compile_s - compile0)
    pools = slots.pools
    return Served(tokens=out, wall_s=wall, compile_s=self.compile_s, steps=steps,
                  calls=calls, prefills=prefills, peak_pages=peak, n_pages=self.n_pages,
                  page_size=self.page_size, cache_bytes=sum(p.nbytes for p in pools),
                  bytes_per_token_layer=pools[0].bytes_per_token_layer,
                  slot_steps=slot_steps, emitted=emitted,
                  mtp_depth=self.model.cfg.mtp_depth if self.speculative else 0)
