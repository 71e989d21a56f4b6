"""Autoregressive generation with the latent KV cache: prefill, jitted decode steps, a
host loop that streams tokens, and loading a model for inference.

Shapes are static: prompts are right-padded to a multiple of PAD_MULTIPLE (their true
lengths travel as an array), the cache is preallocated to max_len, and a decode step is
compiled once (ahead of time, so the reported tokens/s exclude compilation). The decode
state is donated to each step, so the cache is updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from deepseek_jax.model import kv_cache
from deepseek_jax.model.kv_cache import KVCache
from deepseek_jax.model.transformer import Transformer, unstack_layers
from deepseek_jax.inference.sampling import Sampling, sample, split_rng

PAD_MULTIPLE = 16   # prompt lengths are bucketed so few prefill shapes get compiled


@struct.dataclass
class DecodeState:
  cache: KVCache
  token: jax.Array   # [B] int32: the newest token, not yet run through the model
  rng: jax.Array


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int = PAD_MULTIPLE):
  """(tokens [B, T] int32 right-padded with 0, lengths [B] int32); T a multiple."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  T = -(-int(lengths.max()) // multiple) * multiple
  tokens = np.zeros((len(prompts), T), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, lengths


def at_index(x_BT, idx_B):
  """x[b, idx[b]] for every row (x may have trailing dims)."""
  return x_BT[jnp.arange(x_BT.shape[0]), idx_B]


def prefill_cache(variables, tokens_BT, lengths_B, *, model: Transformer, max_len: int,
                  absorb: bool = True, cache_dtype=None):
  """(DecodeOutput, cache) of the prompts run through an empty cache of max_len."""
  cfg = model.cfg
  cache = kv_cache.create(cfg, cfg.n_layers, tokens_BT.shape[0], max_len, cache_dtype)
  return model.apply(variables, tokens_BT, cache, lengths_B, absorb=absorb,
                     method=Transformer.extend)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_len", "absorb",
                                             "cache_dtype"))
def prefill(variables, tokens_BT, lengths_B, rng, *, model: Transformer, sampling: Sampling,
            max_len: int, absorb: bool = True, cache_dtype=None):
  """DecodeState after the prompts, its token the first generated one."""
  out, cache = prefill_cache(variables, tokens_BT, lengths_B, model=model, max_len=max_len,
                             absorb=absorb, cache_dtype=cache_dtype)
  rng, sub = jax.random.split(rng)
  token_B = sample(sub, at_index(out.logits, lengths_B - 1), sampling)
  return DecodeState(cache=cache, token=token_B, rng=rng)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "absorb"),
                   donate_argnums=(1,))
def decode_step(variables, state: DecodeState, *, model: Transformer, sampling: Sampling,
                absorb: bool = True):
  """Runs state.token, picks the next one: (new state, the next token [B])."""
  out, cache = model.apply(variables, state.token[:, None], state.cache, absorb=absorb,
                           method=Transformer.extend)
  rng, sub = split_rng(state.rng, 2, sampling)
  token_B = sample(sub, out.logits[:, 0], sampling)
  return DecodeState(cache=cache, token=token_B, rng=rng), token_B


# The host loop ------------------------------------------------------------------------

@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]        # generated tokens of each row (cut after eos_id)
  prefill_s: float               # prompt processing, first token included
  decode_s: float                # every later token
  compile_s: float
  decode_tokens: int             # kept tokens after each row's first, all rows
  cache_bytes: int               # every KV cache (main model, plus MTP when speculative)
  cache_values_per_token: int
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def tokens_per_s(self) -> float:
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

  def summary(self) -> str:
    parts = [f"{sum(map(len, self.tokens))} tokens", f"decode {self.tokens_per_s:.1f} tok/s",
             f"prefill {self.prefill_s * 1e3:.0f} ms", f"compile {self.compile_s:.1f} s",
             f"KV cache {self.cache_bytes / 2**20:.2f} MiB "
             f"({self.cache_values_per_token} values/token)"]
    parts += [f"{k} {v}" for k, v in self.extra.items()]
    return "; ".join(parts)


class StreamedRows:
  """Per-row output on the host: stops a row at eos or max_new, streams new tokens."""

  def __init__(self, n_rows, max_new, eos_id, on_tokens):
    self.out = [[] for _ in range(n_rows)]
    self.max_new, self.eos_id, self.on_tokens = max_new, eos_id, on_tokens
    self.done = [False] * n_rows

  def add(self, new_rows):
    fresh = []
    for b, new in enumerate(new_rows):
      kept = []
      for t in new:
        if self.done[b]:
          break
        kept.append(int(t))
        self.done[b] = (len(self.out[b]) + len(kept) >= self.max_new
                        or (self.eos_id is not None and int(t) == self.eos_id))
      self.out[b].extend(kept)
      fresh.append(kept)
    if self.on_tokens is not None:
      self.on_tokens(fresh)

  @property
  def n_after_first(self):
    return sum(max(len(r) - 1, 0) for r in self.out)

  @property
  def all_done(self):
    return all(self.done)


def compile_loop(prefill_fn, step_fn, variables, tokens_BT, lengths_B, rng, max_len,
                 cache_dtype, static):
  """Ahead-of-time compiled (prefill, step) of a decoding loop, and the seconds it took."""
  t0 = time.perf_counter()
  pre = prefill_fn.lower(variables, tokens_BT, lengths_B, rng, max_len=max_len,
                         cache_dtype=cache_dtype, **static).compile()
  state_shape = jax.eval_shape(
      lambda *a: prefill_fn(*a, max_len=max_len, cache_dtype=cache_dtype, **static),
      variables, tokens_BT, lengths_B, rng)
  step = step_fn.lower(variables, state_shape, **static).compile()
  return pre, step, time.perf_counter() - t0


def generate(model: Transformer, variables, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, sampling: Sampling = Sampling(), *, seed: int = 0,
             absorb: bool = True, cache_dtype=None, eos_id: int | None = None,
             on_tokens: Callable[[list[list[int]]], None] | None = None,
             max_len: int | None = None) -> Generation:
  """Plain decoding: max_new_tokens per prompt (fewer after eos_id), one token per step.

  on_tokens(new) is called with each row's new tokens as soon as they exist (streaming).
  """
  tokens_BT, lengths_B = pad_prompts(prompts)
  max_len = max_len or tokens_BT.shape[1] + max_new_tokens
  static = dict(model=model, sampling=sampling, absorb=absorb)
  rng = jax.random.PRNGKey(seed)

  pre, step, compile_s = compile_loop(prefill, decode_step, variables, tokens_BT, lengths_B,
                                      rng, max_len, cache_dtype, static)

  rows = StreamedRows(len(prompts), max_new_tokens, eos_id, on_tokens)
  t0 = time.perf_counter()
  state = pre(variables, tokens_BT, lengths_B, rng)
  rows.add(np.asarray(state.token)[:, None])
  prefill_s = time.perf_counter() - t0

  t0, n_steps, pending = time.perf_counter(), 0, None
  # Step s+1 is dispatched before step s's token is pulled, so the device never waits
  # for the host (the state is donated; the returned token is a separate buffer).
  while not rows.all_done or pending is not None:
    if not rows.all_done and n_steps < max_new_tokens - 1:
      state, token = step(variables, state)
      n_steps += 1
    else:
      token = None
    if pending is not None:
      rows.add(np.asarray(pending)[:, None])
    pending = token
  decode_s = time.perf_counter() - t0
  return Generation(tokens=rows.out, prefill_s=prefill_s, decode_s=decode_s,
                    compile_s=compile_s, decode_tokens=rows.n_after_first,
                    cache_bytes=state.cache.nbytes,
                    cache_values_per_token=state.cache.values_per_token)


def check_generation(cfg, prompt_lengths: Sequence[int], max_new_tokens: int,
                     trained_len: int, cache_dtype=None, memory_bytes: int | None = None):
  """Refuses what cannot run and names what will run badly, before anything compiles:
  ValueError for max_new_tokens < 1 or a KV cache (every layer, MTP drafters included)
  larger than half of memory_bytes (default: this host's memory); returns warnings, e.g.
  a context past trained_len (the sequence length the model was trained at)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
  longest = max(prompt_lengths)
  context = longest + max_new_tokens
  # generate's max_len: the padded prompt (pad_prompts) plus the new tokens
  max_len = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE + max_new_tokens
  itemsize = jnp.dtype(cache_dtype or cfg.dtype).itemsize
  cache = (len(prompt_lengths) * max_len * (cfg.n_layers + cfg.mtp_depth)
           * kv_cache.kv_values_per_token_layer(cfg)["MLA"] * itemsize)
  if memory_bytes is None:
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if cache > memory_bytes / 2:
    raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} needs "
                     f"a KV cache of {cache / 2**30:.1f} GiB for {len(prompt_lengths)} "
                     f"row(s), over half of this host's {memory_bytes / 2**30:.1f} GiB")
  warnings = []
  if context > trained_len:
    warnings.append(f"{context} tokens of context (prompt {longest} + {max_new_tokens} new) "
                    f"go past the {trained_len} the model was trained at: expect worse "
                    "output there")
  return warnings


# Loading a model for inference ---------------------------------------------------------

def run_config_path(workdir: str) -> str:
  """DIR/config.json of a training run; a clear FileNotFoundError where there is none."""
  from deepseek_jax.train.checkpoint import CONFIG_FILE
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    where = "does not exist" if not os.path.exists(workdir) else f"has no {CONFIG_FILE}"
    raise FileNotFoundError(
        f"no training run in {workdir} (the directory {where}): pass the --workdir of an "
        f"`experiments.train` or ablation run, or --hf_dir for a Hugging Face checkpoint")
  return path


def load_workdir(workdir: str, step: int | None = None):
  """(model, variables {"params", "balance"}, run config, step) from a training workdir:
  the newest orbax checkpoint in DIR/checkpoints (or the one at `step`) and the config in
  DIR/config.json."""
  from deepseek_jax.model.transformer import BALANCE
  from deepseek_jax.train.evaluation import restore_state

  run_config_path(workdir)    # a clear error for a folder that holds no run
  model, state, run_cfg, step, _ = restore_state(workdir, step)
  params = state.params
  if model.cfg.scan_layers:   # cached decoding runs the unrolled layout
    params = unstack_layers(params, model.cfg)
    model = Transformer(model.cfg.replace(scan_layers=False))
  variables = {"params": params}
  if state.expert_bias is not None:
    variables[BALANCE] = {"expert_bias": state.expert_bias}
  return model, variables, run_cfg, step

