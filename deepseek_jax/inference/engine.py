"""Continuous batching over the paged latent cache: many requests, a fixed set of slots.

The engine holds `slots` rows of a PagedCache and a queue of requests. Each turn of its
loop it admits waiting requests into free slots (a prefill of that one row: the model
runs the prompt against the shared page pool through the row's own page table, so the
other slots pay nothing), then decodes one token for every running slot in one batched
step. A request that reaches its token budget or eos gives its pages back and its slot
to the next request in the queue. Pages are reserved at admission for the prompt and
the token budget, so a running request never waits for memory; a request waits in the
queue while too few pages are free.

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

from deepseek_jax.inference.decoding import PAD_MULTIPLE
from deepseek_jax.inference.sampling import Sampling, sample, split_rng
from deepseek_jax.model import paged_cache
from deepseek_jax.model.transformer import Transformer


@dataclasses.dataclass
class Served:
  tokens: list[list[int]]     # completion ids per request, in input order
  wall_s: float               # the loop, from the first admission to the last token
  compile_s: float
  steps: int                  # batched decode steps
  prefills: int
  peak_pages: int             # most pages held at once
  n_pages: int
  page_size: int
  cache_bytes: int            # the page pool
  bytes_per_token_layer: int  # one position of one layer in the pool

  @property
  def tokens_per_s(self) -> float:
    n = sum(map(len, self.tokens))
    return n / self.wall_s if self.wall_s > 0 else float("nan")

  def summary(self) -> str:
    return (f"{len(self.tokens)} requests, {sum(map(len, self.tokens))} tokens in "
            f"{self.wall_s:.2f} s: {self.tokens_per_s:.1f} tok/s; {self.steps} batched "
            f"steps, {self.prefills} prefills; cache peak {self.peak_pages}/{self.n_pages} "
            f"pages of {self.page_size} ({self.cache_bytes / 2**20:.2f} MiB pool, "
            f"{self.bytes_per_token_layer} bytes a token a layer); "
            f"compile {self.compile_s:.1f} s")


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnums=(1,))
def _prefill(variables, cache, pages_1J, tokens_1T, n_1, rng, *, model, sampling):
  """One request's prompt through its own page table: (pools, first token [1])."""
  row = cache.rows(pages_1J, jnp.zeros((1,), jnp.int32))
  out, row = model.apply(variables, tokens_1T, row, n_1, method=Transformer.extend)
  token = sample(rng, out.logits[jnp.arange(1), n_1 - 1], sampling)
  return cache.replace(c_kv=row.c_kv, k_rope=row.k_rope), token


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnums=(1,))
def _step(variables, cache, pages_BJ, lengths_B, tokens_B, active_B, rng, *, model,
          sampling):
  """One token for every active slot: (pools, next token [B])."""
  rows = cache.rows(pages_BJ, lengths_B)
  out, rows = model.apply(variables, tokens_B[:, None], rows, active_B.astype(jnp.int32),
                          method=Transformer.extend)
  token = sample(rng, out.logits[:, 0], sampling)
  return cache.replace(c_kv=rows.c_kv, k_rope=rows.k_rope), token


class Engine:
  """serve(prompts, max_new_tokens) -> Served. One compiled step for the slots, one
  compiled prefill per prompt-length bucket (multiples of PAD_MULTIPLE)."""

  def __init__(self, model: Transformer, variables, *, slots: int, max_len: int,
               page_size: int = 16, n_pages: int | None = None,
               sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None,
               cache_dtype=None):
    if slots < 1 or page_size < 1:
      raise ValueError(f"slots and page_size must be >= 1; got {slots}, {page_size}")
    self.model, self.variables, self.sampling = model, variables, sampling
    self.slots, self.page_size, self.eos_id = slots, page_size, eos_id
    self.max_pages = -(-max_len // page_size)
    # Default pool: every slot at max_len (what a dense cache would hold).
    self.n_pages = n_pages or slots * self.max_pages
    self.cache = paged_cache.create(model.cfg, model.cfg.n_layers, self.n_pages, page_size,
                                    slots, self.max_pages, cache_dtype)
    self.rng = jax.random.PRNGKey(seed)
    self.compile_s = 0.0
    self._compiled = {}

  def _fn(self, name, fn, *args):
    """fn compiled ahead of time for these argument shapes (its compile time counted)."""
    key = (name,) + tuple(getattr(a, "shape", None) for a in args[2:])
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = fn.lower(*args, model=self.model,
                                     sampling=self.sampling).compile()
      self.compile_s += time.perf_counter() - t0
    return self._compiled[key]

  def serve(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Served:
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    need = [-(-(len(p) + max_new_tokens) // self.page_size) for p in prompts]
    if min(map(len, prompts), default=1) < 1:
      raise ValueError("every prompt needs at least one token")
    if max(need, default=0) > min(self.max_pages, self.n_pages):
      raise ValueError(f"a prompt of {max(map(len, prompts))} tokens + {max_new_tokens} new "
                       f"needs {max(need)} pages of {self.page_size}; this engine has "
                       f"{min(self.max_pages, self.n_pages)} a row (raise max_len)")
    free_pages = collections.deque(range(self.n_pages))
    table = np.full((self.slots, self.max_pages), self.n_pages, np.int32)
    lengths = np.zeros(self.slots, np.int32)
    last = np.zeros(self.slots, np.int32)
    owner = [None] * self.slots                 # request index per slot
    out = [[] for _ in prompts]
    queue = collections.deque(range(len(prompts)))
    steps = prefills = peak = 0
    t0 = time.perf_counter()
    compile0 = self.compile_s

    def finish(slot):
      for p in table[slot]:
        if p != self.n_pages:
          free_pages.append(int(p))
      table[slot] = self.n_pages
      lengths[slot] = 0
      owner[slot] = None

    def done(r):
      return len(out[r]) >= max_new_tokens or (
          self.eos_id is not None and out[r] and out[r][-1] == self.eos_id)

    while queue or any(o is not None for o in owner):
      for slot in range(self.slots):           # admit into free slots
        if owner[slot] is not None or not queue or len(free_pages) < need[queue[0]]:
          continue
        r = queue.popleft()
        table[slot, :need[r]] = [free_pages.popleft() for _ in range(need[r])]
        n = len(prompts[r])
        T = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = prompts[r]
        self.rng, sub = jax.random.split(self.rng)
        args = (self.variables, self.cache, table[slot:slot + 1], tokens,
                np.array([n], np.int32), sub)
        self.cache, first = self._fn("prefill", _prefill, *args)(*args)
        prefills += 1
        owner[slot], lengths[slot] = r, n
        out[r].append(int(first[0]))
        last[slot] = out[r][-1]
        if done(r):
          finish(slot)
      peak = max(peak, self.n_pages - len(free_pages))
      active = np.array([o is not None for o in owner])
      if not active.any():
        continue
      self.rng, sub = split_rng(self.rng, 2, self.sampling)
      args = (self.variables, self.cache, table, lengths, last, active, sub)
      self.cache, token = self._fn("step", _step, *args)(*args)
      steps += 1
      token = np.asarray(token)
      for slot in np.flatnonzero(active):
        r = owner[slot]
        lengths[slot] += 1
        out[r].append(int(token[slot]))
        last[slot] = token[slot]
        if done(r):
          finish(slot)
    wall = time.perf_counter() - t0 - (self.compile_s - compile0)
    return Served(tokens=out, wall_s=wall, compile_s=self.compile_s, steps=steps,
                  prefills=prefills, peak_pages=peak, n_pages=self.n_pages,
                  page_size=self.page_size, cache_bytes=self.cache.nbytes,
                  bytes_per_token_layer=self.cache.bytes_per_token_layer)
