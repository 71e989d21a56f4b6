"""Decode benchmarks: absorbed vs naive MLA decode against context length, KV-cache size
against MHA / GQA / MQA, MTP speculative decoding vs plain, and the device cost of one
speculative round against one plain step.

Each function returns rows (dicts) or a flat dict; experiments/bench_decode.py prints
rows as JSON lines and experiments/bench.py folds `run()` into its table. Timings are
medians or minima of interleaved repetitions: load on a shared machine drifts, and
alternating keeps it from favouring whichever variant ran in a quiet spell.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.inference import decoding, speculative
from deepseek_jax.model import config, kv_cache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.transformer import Transformer
from deepseek_jax.inference.sampling import Sampling


# Absorbed vs naive decode --------------------------------------------------------------

def absorb_config(tiny: bool = False) -> ModelConfig:
  """V2-Lite's attention (d 2048, 16 heads, no q-LoRA, R 512, H = O 128, P 64) in two
  dense layers, so that attention dominates the step; tiny: a smoke-test size."""
  if tiny:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, q_lora_rank=None,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8, ffn_dim=32, first_k_dense=1, mtp_depth=0)
  return ModelConfig(vocab_size=1024, d_model=2048, n_layers=2, n_heads=16, q_lora_rank=None,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, ffn_dim=1408, first_k_dense=2, mtp_depth=0)


def attention_gflop_per_layer(cfg: ModelConfig, context: int) -> tuple[float, float]:
  """(naive, absorbed) attention GFLOP per layer per decode step over `context` keys
  (the one query token's projections left out): naive re-expands K and V of every key
  from the latent; absorbed scores and mixes in the latent space."""
  N, H, R, P, O = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank,
                   cfg.qk_rope_head_dim, cfg.v_head_dim)
  naive = 2 * context * (R * N * (H + O) + N * (H + P) + N * O)
  absorbed = 2 * context * (N * (R + P) + N * R)
  return naive * 1e-9, absorbed * 1e-9


def absorbed_vs_naive(contexts=(256, 512, 1024, 2048, 4096, 8192), repeats: int = 5,
                      tiny: bool = False) -> list[dict]:
  """One decode step (batch 1) with the cache filled to each context length, absorbed
  and naive alternating; ms are medians of `repeats` steps."""
  cfg = absorb_config(tiny)
  model = Transformer(cfg)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)))(
      jax.random.PRNGKey(0))
  token = jnp.ones((1, 1), jnp.int32)
  rows = []
  for S in contexts:
    # A cache of random latents at length S-1: the step attends over S keys.
    rng = np.random.default_rng(S)
    cache = kv_cache.create(cfg, cfg.n_layers, 1, S)
    cache = cache.replace(
        c_kv=jnp.asarray(rng.standard_normal(cache.c_kv.shape), cache.c_kv.dtype),
        k_rope=jnp.asarray(rng.standard_normal(cache.k_rope.shape), cache.k_rope.dtype),
        lengths=jnp.full((1,), S - 1, jnp.int32))
    steps, caches, times = {}, {}, {True: [], False: []}
    for absorb in (True, False):
      # As in decoding.decode_step, the cache is donated (updated in place); the length
      # is set back each step so that every step attends over the same S keys.
      def step(v, t, c, a=absorb):
        out, c = model.apply(v, t, c, absorb=a, method=Transformer.extend)
        return out.logits, c.with_lengths(c.lengths - 1)
      steps[absorb] = jax.jit(step, donate_argnums=2)
      logits, caches[absorb] = steps[absorb](variables, token, jax.tree.map(jnp.copy, cache))
      logits.block_until_ready()
    for _ in range(repeats):
      for absorb in (True, False):
        t0 = time.perf_counter()
        logits, caches[absorb] = steps[absorb](variables, token, caches[absorb])
        logits.block_until_ready()
        times[absorb].append(time.perf_counter() - t0)
    absorbed_ms = 1e3 * float(np.median(times[True]))
    naive_ms = 1e3 * float(np.median(times[False]))
    naive_gf, absorbed_gf = attention_gflop_per_layer(cfg, S)
    rows.append({"context": S, "absorbed_ms": round(absorbed_ms, 3),
                 "naive_ms": round(naive_ms, 3), "speedup": round(naive_ms / absorbed_ms, 2),
                 "naive_attn_gflop": round(naive_gf, 3),
                 "absorbed_attn_gflop": round(absorbed_gf, 3)})
  return rows


# KV-cache size ---------------------------------------------------------------------------

def kv_bytes() -> list[dict]:
  """Cache values per token per layer at V3's sizes: MLA against MHA / GQA-8 / MQA."""
  cfg = config.deepseek_v3_671b()
  per_layer = kv_cache.kv_values_per_token_layer(cfg)
  cache = jax.eval_shape(lambda: kv_cache.create(cfg, cfg.n_layers, 1, 1, "bfloat16"))
  if cache.values_per_token != per_layer["MLA"] * cfg.n_layers:
    raise AssertionError("kv_cache.create and kv_values_per_token_layer disagree")
  return [{"layout": name, "values_per_token_layer": values,
           "bf16_bytes_per_token_layer": 2 * values,
           "bf16_bytes_per_token_61_layers": 2 * values * cfg.n_layers,
           "bf16_GiB_per_128k_context": round(2 * values * cfg.n_layers * 131072 / 2**30, 2),
           "fraction_of_MHA": round(values / per_layer["MHA"], 4)}
          for name, values in per_layer.items()]


# Speculative decoding ------------------------------------------------------------------

def validation_prompts(run_cfg, vocab_size: int, n: int, length: int) -> list[list[int]]:
  """n evenly spaced slices of the run's validation stream (never trained on)."""
  from deepseek_jax.data import corpus as corpus_lib
  corpus = corpus_lib.load_corpus(run_cfg.data, vocab_size)
  val = corpus.val[0]
  starts = np.linspace(0, len(val) - length - 1, n).astype(int)
  return [val.read(s, s + length).astype(int).tolist() for s in starts]


def speculative_vs_plain(model: Transformer, variables, prompts, max_new_tokens: int,
                         depths=None, batch: int = 1, repeats: int = 3) -> dict:
  """Greedy tokens/s of plain decoding and of MTP speculative decoding at each depth
  (the first k modules), on the same prompts. Per batch of prompts, the modes take turns
  `repeats` times and each keeps its fastest run. Returns {"plain": {...},
  "mtp_depth_k": {...}} with tokens_per_s, and for the drafts speedup_vs_plain,
  acceptance_per_depth, tokens_per_round and same_tokens_as_plain (exactness)."""
  depths = list(depths or range(1, model.cfg.mtp_depth + 1))
  batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
  modes = {"plain": (decoding.generate, model, variables)}
  for depth in depths:
    modes[f"mtp_depth_{depth}"] = (speculative.speculative_generate,
                                   *speculative.with_draft_depth(model, variables, depth))
  for fn, m, v in modes.values():
    fn(m, v, batches[0], max_new_tokens)   # compiles and warms up; not timed
  best = {name: [] for name in modes}     # per mode: the fastest run of each batch
  for prompts_b in batches:
    runs = {name: [] for name in modes}
    for _ in range(repeats):
      for name, (fn, m, v) in modes.items():
        runs[name].append(fn(m, v, prompts_b, max_new_tokens))
    for name in modes:
      best[name].append(min(runs[name], key=lambda r: r.decode_s))
  tps = {name: sum(r.decode_tokens for r in rs) / sum(r.decode_s for r in rs)
         for name, rs in best.items()}
  plain_tokens = sum((r.tokens for r in best["plain"]), [])
  out = {"plain": {"tokens_per_s": tps["plain"]}}
  for depth in depths:
    name = f"mtp_depth_{depth}"
    reached = sum(np.asarray(r.extra["row_rounds_reaching_depth"]) for r in best[name])
    out[name] = {"tokens_per_s": tps[name], "speedup_vs_plain": tps[name] / tps["plain"],
                 "acceptance_per_depth": [float(reached[k] / reached[k - 1])
                                          if reached[k - 1] else float("nan")
                                          for k in range(1, depth + 1)],
                 "tokens_per_round": float(1 + reached[1:].sum() / reached[0]),
                 "same_tokens_as_plain": sum((r.tokens for r in best[name]), [])
                                         == plain_tokens}
  return out


def engine_step_ms(engine, repeats: int = 5) -> float:
  """Device ms of one step of the engine's compiled program (speculative: one round),
  one slot running with no budget to reach: calls of steps_per_call steps, the fastest
  of `repeats`, so that a call's dispatch and transfers are spread over its steps.
  Writes only on the pages of slot 0's table (a later serve prefills before it reads)."""
  table = np.full((engine.slots, engine.max_pages), engine.n_pages, np.int32)
  table[0] = np.arange(engine.max_pages)
  left = np.full((engine.slots,), 2 ** 30, np.int32)
  run = lambda: len(engine.slots_state.run(table, left, -1, jax.random.PRNGKey(0)))
  run()   # compiles
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    n = run()
    best = min(best, (time.perf_counter() - t0) / n)
  return 1e3 * best


def engine_speculative_vs_plain(model: Transformer, variables, prompts, max_new_tokens: int,
                                depths=(1, 2, 3), slots: int = 1, repeats: int = 3) -> dict:
  """The serving engine (inference/engine.py) on the same prompts, plain and with MTP
  speculation at each draft depth (past the model's MTP depth the last module is
  chained); modes take turns `repeats` times, each keeps its fastest run. Returns
  {"plain": {...}, "engine_depth_k": {...}} with tokens_per_s and step_ms (engine_step_ms),
  and for the drafts speedup_vs_plain, acceptance, tokens_per_round, round_over_step
  (a round's device time in plain steps: speculation pays where tokens_per_round exceeds
  it) and same_tokens_as_plain."""
  from deepseek_jax.inference.engine import Engine
  max_len = max(map(len, prompts)) + max_new_tokens
  engines = {"plain": Engine(model, variables, slots=slots, max_len=max_len)}
  for depth in depths:
    engines[f"engine_depth_{depth}"] = Engine(model, variables, slots=slots, max_len=max_len,
                                              speculative=True, draft_depth=depth)
  for engine in engines.values():
    engine.serve(prompts[:slots], max_new_tokens)   # compiles and warms up; not timed
  runs = {name: [] for name in engines}
  step_ms = {name: float("inf") for name in engines}
  for _ in range(repeats):
    for name, engine in engines.items():
      runs[name].append(engine.serve(prompts, max_new_tokens))
      step_ms[name] = min(step_ms[name], engine_step_ms(engine, repeats=2))
  best = {name: max(rs, key=lambda r: r.tokens_per_s) for name, rs in runs.items()}
  out = {"plain": {"tokens_per_s": best["plain"].tokens_per_s, "step_ms": step_ms["plain"]}}
  for name, served in best.items():
    if name != "plain":
      out[name] = {"tokens_per_s": served.tokens_per_s, "step_ms": step_ms[name],
                   "speedup_vs_plain": served.tokens_per_s / best["plain"].tokens_per_s,
                   "acceptance": served.acceptance,
                   "tokens_per_round": served.emitted / max(served.slot_steps, 1),
                   "round_over_step": step_ms[name] / step_ms["plain"],
                   "same_tokens_as_plain": served.tokens == best["plain"].tokens}
  return out


def train_drafter(workdir: str, steps: int, small_corpus: bool = False, n_layers: int = 2):
  """Trains configs/smoke.py (byte tokens, one MTP module; n_layers deep) for `steps`
  steps on the embedded corpus into workdir, so that the drafts are a trained model's,
  not noise.
  small_corpus (the --tiny smoke run): only the stdlib's json package, so that reading
  and tokenizing the whole corpus (~40 s of a ~90 s smoke run) is not paid for 4 steps.
  Returns decoding.load_workdir(workdir)."""
  import sysconfig
  from configs import smoke
  from deepseek_jax.train import loop as trainer
  cfg = smoke.get_config()
  cfg.model.n_layers = n_layers
  if small_corpus:
    cfg.data.source = "files"
    cfg.data.paths = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
    cfg.data.val_fraction = 0.25
  cfg.total_steps = steps
  cfg.checkpoint_every = steps
  cfg.eval_every = steps
  cfg.optimizer.warmup_steps = max(steps // 20, 1)
  trainer.train(cfg, workdir)
  return decoding.load_workdir(workdir)


# Round cost ------------------------------------------------------------------------------

def round_cost(layers=(4, 16), repeats: int = 5) -> list[dict]:
  """Device ms of one plain decode step and one speculative round (draft + verify) at
  depths 1 and 2, on random weights of the small preset's width: speculation pays when
  tokens per round exceed round_over_step, whatever the weights."""
  static = dict(sampling=Sampling(), absorb=True)
  prompt = np.arange(1, 33, dtype=np.int32)[None]
  lengths = np.array([32], np.int32)
  rng = jax.random.PRNGKey(0)

  def timed(fn, state, n=50):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(state)
      state = out[0]
    jax.block_until_ready(out)
    return state, 1e3 * (time.perf_counter() - t0) / n

  rows = []
  for n_layers in layers:
    runs = {}   # depth -> [step function, state]
    for depth in (0, 1, 2):
      model = Transformer(config.small().replace(n_layers=n_layers, mtp_depth=depth))
      v = jax.jit(lambda r, m=model: m.init(r, jnp.zeros((1, 8), jnp.int32)))(rng)
      if depth == 0:
        state = decoding.prefill(v, prompt, lengths, rng, model=model, max_len=1024, **static)
        fn = lambda s, v=v, m=model: decoding.decode_step(v, s, model=m, **static)
      else:
        state = speculative.spec_prefill(v, prompt, lengths, rng, model=model, max_len=1024,
                                         **static)
        fn = lambda s, v=v, m=model: speculative.spec_round(v, s, model=m, **static)
      runs[depth] = [fn, timed(fn, state, 2)[0]]   # compiles
    best = {depth: float("inf") for depth in runs}
    for _ in range(repeats):   # chunks of 50 calls, modes taking turns, fastest kept
      for depth, run in runs.items():
        run[1], ms = timed(*run)
        best[depth] = min(best[depth], ms)
    row = {"n_layers": n_layers, "plain_step_ms": round(best[0], 3)}
    for depth in (1, 2):
      row[f"round_ms_depth_{depth}"] = round(best[depth], 3)
      row[f"round_over_step_depth_{depth}"] = round(best[depth] / best[0], 3)
    rows.append(row)
  return rows


# The bench command's decode part ------------------------------------------------------

ENGINE_DEPTHS = (1, 2, 3)   # the engine's draft depths (past 1 the module is chained)

def run(tiny: bool = False, repeats: int = 5, spec_workdir: str | None = None,
        drafter_steps: int = 300, drafter_layers: int = 8) -> dict:
  """Flat keys for experiments/bench.py: absorbed vs naive at 4k context (on the tiny
  attention config when tiny), and speculative vs plain greedy decoding, through
  decoding.generate and through the serving engine (one slot; 1 draft, 2 and 3 chained),
  with the MTP module of spec_workdir's run, or of a drafter of drafter_layers layers
  trained here for drafter_steps steps. The drafter is 8 layers deep by default so that
  its one-layer MTP module costs a fraction of the main model, as V3's does (1 of 61
  layers); in the 2-layer smoke model the module costs about half a step."""
  row = absorbed_vs_naive((4096,), repeats=repeats, tiny=tiny)[0]
  out = {"decode_absorbed_ms_4k": row["absorbed_ms"], "decode_naive_ms_4k": row["naive_ms"],
         "decode_speedup_absorbed_vs_naive_4k": row["speedup"]}
  with tempfile.TemporaryDirectory() as tmp:
    if spec_workdir:
      model, variables, run_cfg, _ = decoding.load_workdir(spec_workdir)
    else:
      model, variables, run_cfg, _ = train_drafter(
          os.path.join(tmp, "drafter"), 4 if tiny else drafter_steps, small_corpus=tiny,
          n_layers=2 if tiny else drafter_layers)
    if model.cfg.mtp_depth < 1:
      raise ValueError(f"{spec_workdir} has no MTP module to draft with")
    n, length, max_new = (2, 16, 8) if tiny else (16, 32, 64)
    prompts = validation_prompts(run_cfg, model.cfg.vocab_size, n, length)
    rep = max(1, min(repeats, 3))
    spec = speculative_vs_plain(model, variables, prompts, max_new, depths=[1], repeats=rep)
    engine = engine_speculative_vs_plain(model, variables, prompts, max_new,
                                         depths=ENGINE_DEPTHS, repeats=rep)
  out["drafter_layers"] = model.cfg.n_layers
  out["plain_decode_tokens_per_s"] = spec["plain"]["tokens_per_s"]
  out["speculative_tokens_per_s"] = spec["mtp_depth_1"]["tokens_per_s"]
  out["speculative_speedup"] = spec["mtp_depth_1"]["speedup_vs_plain"]
  out["speculative_acceptance"] = spec["mtp_depth_1"]["acceptance_per_depth"][0]
  out["speculative_exact"] = spec["mtp_depth_1"]["same_tokens_as_plain"]
  out["engine_plain_tokens_per_s"] = engine["plain"]["tokens_per_s"]
  out["engine_plain_step_ms"] = engine["plain"]["step_ms"]
  for depth in ENGINE_DEPTHS:
    r = engine[f"engine_depth_{depth}"]
    for key in ("speedup_vs_plain", "acceptance", "tokens_per_round", "round_over_step"):
      out[f"engine_speculative_{key.replace('_vs_plain', '')}_depth_{depth}"] = r[key]
    out[f"engine_speculative_exact_depth_{depth}"] = r["same_tokens_as_plain"]
  return out
