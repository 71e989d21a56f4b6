"""Serving: the paged latent cache against the dense one, and continuous batching against
each request decoded alone (greedy): ragged prompt lengths, requests finishing at
different steps, more requests than slots, fewer pages than slots x max_len."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference import decoding
from deepseek_jax.inference.engine import Engine
from deepseek_jax.model import config, kv_cache, paged_cache
from deepseek_jax.model.transformer import Transformer

from test_decoding import TINY, _variables

CFG = TINY


def _extend(cfg):
  return jax.jit(lambda v, tokens, cache, n: Transformer(cfg).apply(
      v, tokens, cache, n, method=Transformer.extend))


def test_paged_cache_reads_and_writes_like_the_dense_cache():
  """Rows on scattered, interleaved pages: chunked extends give the dense cache's logits
  and its latents position for position; a row's padding and an idle row (no pages)
  write nothing into another row's pages."""
  v = _variables(CFG)
  B, page, J = 3, 4, 6
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (B, 20)).astype(np.int32)
  dense = kv_cache.create(CFG, CFG.n_layers, B, page * J)
  paged = paged_cache.create(CFG, CFG.n_layers, 16, page, B, J)
  # Row 0 and row 1 take interleaved pages in scrambled order; row 2 owns none (idle).
  table = np.full((B, J), 16, np.int32)
  table[0, :5] = [9, 2, 14, 5, 0]
  table[1, :5] = [3, 11, 7, 1, 12]
  paged = paged.rows(jnp.asarray(table), paged.lengths)
  before = np.asarray(paged.c_kv).copy()
  run = _extend(CFG)
  at = 0
  for size, n_new in [(7, (7, 5, 0)), (1, (1, 1, 0)), (8, (8, 8, 0))]:
    n = jnp.asarray(n_new, jnp.int32)
    out_d, dense = run(v, tokens[:, at:at + size], dense, n)
    out_p, paged = run(v, tokens[:, at:at + size], paged, n)
    for b in (0, 1):
      np.testing.assert_allclose(out_p.logits[b, :n_new[b]], out_d.logits[b, :n_new[b]],
                                 rtol=1e-5, atol=1e-5)
    at += size
  np.testing.assert_array_equal(paged.lengths, dense.lengths)
  for i in range(CFG.n_layers):
    c_p, r_p = paged.layer(i)
    c_d, r_d = dense.layer(i)
    for b in (0, 1):
      L = int(dense.lengths[b])
      np.testing.assert_allclose(c_p[b, :L], c_d[b, :L], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(r_p[b, :L], r_d[b, :L], rtol=1e-6, atol=1e-6)
  untouched = sorted(set(range(16)) - set(table[:2].ravel()))
  np.testing.assert_array_equal(np.asarray(paged.c_kv)[:, untouched], before[:, untouched])


def _alone(v, prompts, max_new):
  """Each request decoded by itself (decoding.generate, one row), greedy."""
  model = Transformer(CFG)
  return [decoding.generate(model, v, [p], max_new).tokens[0] for p in prompts]


@pytest.mark.parametrize("slots,n_pages,steps_per_call", [(3, None, 16), (4, 12, 16),
                                                          (3, None, 1)])
def test_engine_equals_each_request_decoded_alone(slots, n_pages, steps_per_call):
  """9 requests of ragged lengths (1 .. 19 tokens) through 3 or 4 slots: each completion
  equals that request decoded alone, token for token; with a pool of 12 pages of 8 (less
  than 4 slots x 5 pages) requests wait for pages and still match; every page returns;
  one step a call (the host between every two steps) gives the same tokens."""
  v = _variables(CFG)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(1, CFG.vocab_size, n)) for n in (5, 1, 19, 8, 3, 12, 16, 2, 9)]
  max_new = 6
  engine = Engine(Transformer(CFG), v, slots=slots, max_len=40, page_size=8,
                  n_pages=n_pages, steps_per_call=steps_per_call)
  served = engine.serve(prompts, max_new)
  assert served.tokens == _alone(v, prompts, max_new)
  assert served.prefills == len(prompts) and served.peak_pages <= engine.n_pages
  assert served.steps < len(prompts) * (max_new - 1)    # rows shared the steps
  assert (served.calls == served.steps) == (steps_per_call == 1)


def test_engine_calls_run_until_a_request_ends_and_waste_no_step():
  """One slot, no eos: a call's device loop runs until the request's budget is spent (at
  most steps_per_call steps), so the steps are exactly the tokens after each prefill's
  first, and the calls ceil(those / steps_per_call) a request; speculative rounds stop
  at the round that fills the budget (calls = requests), however many tokens it emits."""
  v = _variables(CFG)
  prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5]]
  served = Engine(Transformer(CFG), v, slots=1, max_len=32, page_size=8,
                  steps_per_call=4).serve(prompts, 11)
  assert served.tokens == _alone(v, prompts, 11)
  assert served.steps == 3 * 10 and served.calls == 3 * 3     # 10 steps: 4 + 4 + 2
  spec = Engine(Transformer(CFG), v, slots=1, max_len=32, page_size=8,
                speculative=True).serve(prompts, 11)
  assert spec.tokens == served.tokens and spec.calls == 3
  assert served.steps == served.slot_steps and spec.steps == spec.slot_steps   # none idle


def test_engine_stops_each_request_at_eos_and_admits_the_next():
  """With an eos id, a request ends at its first eos (kept) and its slot takes the next
  request: completions have different lengths and each is the alone decode's prefix up
  to and including its eos."""
  v = _variables(CFG)
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(1, CFG.vocab_size, n)) for n in (4, 7, 2, 11, 6)]
  full = _alone(v, prompts, 8)
  # The token that some request produces first at its third step: an eos for it.
  eos = full[0][2]
  want = []
  for f in full:
    cut = f.index(eos) + 1 if eos in f else len(f)
    want.append(f[:cut])
  served = Engine(Transformer(CFG), v, slots=2, max_len=32, page_size=4,
                  eos_id=eos).serve(prompts, 8)
  assert served.tokens == want
  assert len({len(t) for t in served.tokens}) > 1


def test_engine_refuses_what_cannot_fit_in_one_line():
  v = _variables(CFG)
  engine = Engine(Transformer(CFG), v, slots=2, max_len=16, page_size=4)
  with pytest.raises(ValueError, match="needs 6 pages of 4; this engine has 4 a row"):
    engine.serve([[1] * 20], 4)


def test_fp8_pages_have_flashmlas_layout_and_error():
  """V3's fp8 page: 656 bytes a token a layer (512 e4m3 + 4 float32 scales + 64 bf16);
  a block dequantises within e4m3's relative step (2^-3) of its absmax."""
  v3 = config.deepseek_v3_671b()
  cache = paged_cache.create(v3, 1, 2, 4, 1, 2, "fp8")
  assert cache.bytes_per_token_layer == 656 == 512 + 4 * 4 + 64 * 2
  assert paged_cache.create(v3, 1, 2, 4, 1, 2, "bfloat16").bytes_per_token_layer == 1152
  x = np.random.default_rng(0).standard_normal((2, 3, 512)).astype(np.float32)
  x[0, 0, :128] *= 100.0                     # blocks are scaled independently
  q, scale = paged_cache.quantize_fp8(jnp.asarray(x), 4)
  back = (np.asarray(q, np.float32).reshape(2, 3, 4, 128) * np.asarray(scale)[..., None])
  err = np.abs(back.reshape(x.shape) - x).reshape(2, 3, 4, 128).max(-1)
  assert (err <= np.abs(x).reshape(2, 3, 4, 128).max(-1) * 2.0 ** -4).all()
  assert err[0, 0, 1] < 0.2                  # the loud block did not swamp its neighbours


def test_fp8_cache_is_close_to_the_full_precision_cache():
  """16 tokens through float32, bfloat16 and fp8 pages: fp8's logits differ from
  float32's by more than bfloat16's do and by under a tenth of the logits' spread, and
  the next-token argmax agrees at >= 75% of positions; the engine serves on fp8 pages
  in a smaller pool."""
  v = _variables(CFG)
  tokens = np.random.default_rng(4).integers(1, CFG.vocab_size, (1, 16)).astype(np.int32)
  run = _extend(CFG)
  logits = {}
  for dtype in (None, "bfloat16", "fp8"):
    cache = paged_cache.create(CFG, CFG.n_layers, 4, 8, 1, 2, dtype)
    cache = cache.rows(jnp.asarray([[0, 1]]), cache.lengths)
    logits[dtype] = np.asarray(run(v, tokens, cache, jnp.asarray([16], jnp.int32))[0].logits)
  err = {k: np.abs(logits[k] - logits[None]).max() for k in ("bfloat16", "fp8")}
  assert 0 < err["bfloat16"] < err["fp8"] < 0.1 * logits[None].std()
  assert (logits["fp8"].argmax(-1) == logits[None].argmax(-1)).mean() >= 0.75
  prompts = [[3, 5, 7], [11, 13, 17, 19, 23]]
  full = Engine(Transformer(CFG), v, slots=2, max_len=16, page_size=8).serve(prompts, 4)
  fp8 = Engine(Transformer(CFG), v, slots=2, max_len=16, page_size=8,
               cache_dtype="fp8").serve(prompts, 4)
  assert fp8.cache_bytes < full.cache_bytes
  # The engine keeps each write's scales: its completions are those of each request
  # decoded alone on fp8 pages (prefill, then one token a step, greedy).
  assert fp8.tokens == [_alone_on_pages(v, p, 4, "fp8") for p in prompts]


def _alone_on_pages(v, prompt, max_new, dtype):
  """One request decoded greedily on its own paged cache of `dtype` (the prompt padded
  to 16 tokens, as the engine's prefill pads it)."""
  cache = paged_cache.create(CFG, CFG.n_layers, 4, 8, 1, 4, dtype)
  cache = cache.rows(jnp.arange(4, dtype=jnp.int32)[None], cache.lengths)
  tokens = np.zeros((1, 16), np.int32)
  tokens[0, :len(prompt)] = prompt
  run, out = _extend(CFG), []
  logits, cache = run(v, tokens, cache, jnp.asarray([len(prompt)], jnp.int32))
  out.append(int(np.argmax(logits.logits[0, len(prompt) - 1])))
  while len(out) < max_new:
    logits, cache = run(v, np.asarray([[out[-1]]], np.int32), cache,
                        jnp.ones((1,), jnp.int32))
    out.append(int(np.argmax(logits.logits[0, 0])))
  return out


@pytest.mark.parametrize("draft_depth", [None, 3], ids=["trained_depth", "chained"])
def test_speculative_engine_equals_each_request_decoded_alone(draft_depth):
  """MTP speculation inside the engine (one compiled round a step, the modules' caches
  on the same page tables): 9 ragged requests through 3 slots and a 14-page pool, and
  with an eos, give each request's plain greedy decode; with draft_depth 3 the second
  (last trained) module drafts twice more, on its own cache layer."""
  v = _variables(CFG)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(1, CFG.vocab_size, n)) for n in (5, 1, 19, 8, 3, 12, 16, 2, 9)]
  engine = Engine(Transformer(CFG), v, slots=3, max_len=40, page_size=8, n_pages=14,
                  speculative=True, draft_depth=draft_depth)
  served = engine.serve(prompts, 6)
  full = _alone(v, prompts, 6)
  assert served.tokens == full
  assert served.mtp_depth == (draft_depth or CFG.mtp_depth)
  assert engine.slots_state.state.mtp_cache.c_kv.shape[0] == served.mtp_depth
  eos = full[0][2]
  cut = [f[:f.index(eos) + 1] if eos in f else f for f in full]
  assert Engine(Transformer(CFG), v, slots=2, max_len=40, page_size=8, speculative=True,
                eos_id=eos).serve(prompts, 6).tokens == cut


def test_speculative_engine_refuses_a_model_without_mtp():
  cfg = CFG.replace(mtp_depth=0)
  with pytest.raises(ValueError, match="needs MTP modules"):
    Engine(Transformer(cfg), _variables(cfg), slots=1, max_len=8, speculative=True)


@pytest.mark.parametrize("axes", [dict(data=2, expert=2, tensor=2), dict(expert=4, tensor=2)],
                         ids=["data2xexpert2xtensor2", "expert4xtensor2"])
def test_request_sharded_decode_equals_one_device(axes):
  """Decode with the cache split by request over the batch axes, the routed experts over
  an expert axis (expert parallelism inside the cached decode) and heads over tensor, on
  8 devices: a prefill and three decode steps give the one-device logits within 1e-5."""
  from jax.sharding import NamedSharding, PartitionSpec as PS
  from deepseek_jax.model.partitioning import BATCH
  from deepseek_jax.train import sharding
  v = _variables(CFG)
  mesh = sharding.make_mesh({**dict(data=1, fsdp=1, expert=1, context=1, tensor=1), **axes},
                            jax.devices()[:8])
  B = 8
  rng = np.random.default_rng(5)
  prompt = rng.integers(1, CFG.vocab_size, (B, 6)).astype(np.int32)
  steps = rng.integers(1, CFG.vocab_size, (3, B, 1)).astype(np.int32)

  def run(place):
    cache = place(paged_cache.create(CFG, CFG.n_layers, 2 * B, 8, B, 2))
    cache = cache.rows(jnp.arange(2 * B, dtype=jnp.int32).reshape(B, 2), cache.lengths)
    fn = _extend(CFG)
    logits = []
    for tokens in [prompt] + list(steps):
      out, cache = fn(v, tokens, cache, jnp.full((B,), tokens.shape[1], jnp.int32))
      logits.append(np.asarray(out.logits))
    return logits

  want = run(lambda c: c)
  batch = tuple(a for a in BATCH if mesh.shape[a] > 1)
  rows = NamedSharding(mesh, PS(batch))

  def place(cache):
    return cache.replace(pages=jax.device_put(cache.pages, rows),
                         lengths=jax.device_put(cache.lengths, rows))

  abstract = jax.eval_shape(Transformer(CFG).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 8), jnp.int32))
  params = jax.device_put(v["params"], sharding.param_shardings(abstract["params"], mesh))
  v_sharded = {**v, "params": params}
  with jax.set_mesh(mesh):
    fn = _extend(CFG)
    got = []
    cache = place(paged_cache.create(CFG, CFG.n_layers, 2 * B, 8, B, 2))
    cache = cache.rows(jnp.arange(2 * B, dtype=jnp.int32).reshape(B, 2), cache.lengths)
    for tokens in [prompt] + list(steps):
      out, cache = fn(v_sharded, jax.device_put(tokens, rows), cache,
                      jax.device_put(jnp.full((B,), tokens.shape[1], jnp.int32), rows))
      got.append(np.asarray(out.logits))
    text = fn.lower(v_sharded, jax.device_put(steps[0], rows), cache,
                    jax.device_put(jnp.ones((B,), jnp.int32), rows)).as_text()
  assert "all_to_all" in text   # the routed experts ran expert-parallel
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_position_sharded_decode_equals_one_device_and_gathers_no_cache():
  """Decode context parallelism: the dense cache split by position over "context" (4)
  and by request over "data" (2). A prefill and three decode steps give the one-device
  logits within 1e-5, and the compiled decode step all-gathers nothing larger than the
  new token's latents: each shard attends over its own positions and the softmax is
  merged across shards by all-reduces (the log-sum-exp merge, derived by GSPMD)."""
  from jax.sharding import NamedSharding, PartitionSpec as PS
  from deepseek_jax.train import hlo, sharding
  v = _variables(CFG)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=1, context=4, tensor=1),
                            jax.devices()[:8])
  B, S = 4, 64
  rng = np.random.default_rng(6)
  prompt = rng.integers(1, CFG.vocab_size, (B, 20)).astype(np.int32)
  steps = rng.integers(1, CFG.vocab_size, (3, B, 1)).astype(np.int32)
  fn = _extend(CFG)
  split = NamedSharding(mesh, PS(None, "data", "context", None))

  def run(place):
    cache = place(kv_cache.create(CFG, CFG.n_layers, B, S))
    logits = []
    for tokens in [prompt] + list(steps):
      out, cache = fn(v, tokens, cache, jnp.full((B,), tokens.shape[1], jnp.int32))
      logits.append(np.asarray(out.logits))
    return logits, cache

  want, _ = run(lambda c: c)
  with jax.set_mesh(mesh):
    got, cache = run(lambda c: c.replace(c_kv=jax.device_put(c.c_kv, split),
                                         k_rope=jax.device_put(c.k_rope, split)))
    text = fn.lower(v, steps[0], cache, jnp.ones((B,), jnp.int32)).compile().as_text()
  assert cache.c_kv.sharding.spec[2] == "context"
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  h = hlo.read_hlo(text)
  gathered = [max(hlo.array_bytes(i.shape)) for c in h.comps.values() for i in c
              if i.op.startswith("all-gather")]
  one_token = B * (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * 4
  layer_cache = B * S * (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * 4
  assert max(gathered, default=0) <= one_token < layer_cache / 16
  assert any(i.op.startswith("all-reduce") for c in h.comps.values() for i in c)
