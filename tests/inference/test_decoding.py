"""Inference: the latent KV cache, absorbed MLA decode, generation, MTP speculative
decoding. Each fast path is checked against the training forward (the slow reference)."""

import functools
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.inference import decoding, speculative
from deepseek_jax.inference.engine import Engine
from deepseek_jax.model import config, kv_cache
from deepseek_jax.train.losses import lm_losses
from deepseek_jax.model.transformer import BALANCE, Transformer
from deepseek_jax.model.mtp import shift_left
from deepseek_jax.inference.sampling import Sampling, filtered_logits, speculative_accept

# Two layers (dense, MoE) keep compilation short; the MoE layer and both MTP blocks route.
TINY = config.tiny().replace(n_layers=2)
TINY_YARN = config.tiny_yarn().replace(n_layers=2)   # no q-LoRA, YaRN rope, softmax gate
MAX_LEN = 24


def _variables(cfg, seed=0):
  """N(0, init_std) weights and unit norm scales (shapes from eval_shape: an eager init
  costs many seconds), and a non-zero balancing bias, which decode must route with."""
  shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(seed)
  draw = lambda path, s: (np.ones(s.shape, s.dtype) if path[-1].key == "scale" else
                          (cfg.init_std * rng.standard_normal(s.shape)).astype(s.dtype))
  params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
  bias = 0.1 * rng.standard_normal(shapes[BALANCE]["expert_bias"].shape)
  return jax.tree.map(jnp.asarray, {"params": params,
                                    BALANCE: {"expert_bias": bias.astype(np.float32)}})


@functools.lru_cache(maxsize=None)
def _extend(cfg, absorb):
  return jax.jit(lambda v, tokens, cache, n: Transformer(cfg).apply(
      v, tokens, cache, n, absorb=absorb, method=Transformer.extend))


@functools.lru_cache(maxsize=None)
def _forward(cfg, mtp=False):
  return jax.jit(lambda v, tokens: Transformer(cfg).apply(v, tokens, mtp=mtp))


def _tokens(cfg, shape, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=shape).astype(np.int32)


def _cached_logits(cfg, v, tokens_BT, schedule, absorb=True):
  """Logits [B, T, V] of tokens fed through the cache in chunks of the given sizes; after
  the first chunk, junk tokens are written and rolled back (lengths reset)."""
  B = tokens_BT.shape[0]
  run = _extend(cfg, absorb)
  cache = kv_cache.create(cfg, cfg.n_layers, B, MAX_LEN)
  full = lambda n: jnp.full((B,), n, jnp.int32)
  logits, at = [], 0
  for i, size in enumerate(schedule):
    out, cache = run(v, tokens_BT[:, at:at + size], cache, full(size))
    logits.append(out.logits)
    at += size
    if i == 0:
      lengths = cache.lengths
      _, cache = run(v, _tokens(cfg, (B, size), seed=9), cache, full(size))
      cache = cache.with_lengths(lengths)
  return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("cfg", [TINY, TINY_YARN], ids=["q_lora", "no_q_lora_yarn"])
def test_cached_decode_equals_full_forward(cfg):
  v = _variables(cfg)
  tokens = _tokens(cfg, (2, 10))
  want = _forward(cfg)(v, tokens).logits
  got = _cached_logits(cfg, v, tokens, [4] + [1] * 6)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_absorbed_equals_naive():
  v = _variables(TINY)
  tokens = _tokens(TINY, (2, 10), seed=1)
  absorbed = _cached_logits(TINY, v, tokens, [4] + [1] * 6, absorb=True)
  naive = _cached_logits(TINY, v, tokens, [4] + [1] * 6, absorb=False)
  np.testing.assert_allclose(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_mtp_decode_equals_training_mtp():
  """Each MTP module on its cache gives the training forward's depth-k logits (with the
  normed hand-over of HF and vLLM; the speculative test below covers the other)."""
  cfg = TINY.replace(mtp_feed_normed=True)
  v = _variables(cfg)
  B, T, D = 2, 10, cfg.mtp_depth
  tokens = _tokens(cfg, (B, T), seed=2)
  want = _forward(cfg, mtp=True)(v, tokens).mtp_logits
  mtp_extend = jax.jit(functools.partial(Transformer(cfg).apply, method=Transformer.mtp_extend),
                       static_argnums=1)
  out, _ = _extend(cfg, True)(v, tokens, kv_cache.create(cfg, cfg.n_layers, B, MAX_LEN),
                              jnp.full((B,), T, jnp.int32))
  mtp_cache = kv_cache.create(cfg, D, B, MAX_LEN)
  n = jnp.full((B,), T - D, jnp.int32)   # positions whose token i+D exists
  h = out.hidden
  for k in range(1, D + 1):
    o, mtp_cache = mtp_extend(v, k, h, shift_left(tokens, k), mtp_cache, n)
    np.testing.assert_allclose(o.logits[:, :T - D], want[k - 1, :, :T - D], atol=1e-5,
                               rtol=1e-5)
    h = o.hidden


def test_batched_prompts_of_different_lengths():
  """Right-padded prompts of lengths 2 and 4 in one batch, then 6 decode steps, give the
  logits of each sequence alone (batch 1, no padding) at every position."""
  v = _variables(TINY)
  lengths = [2, 4]
  seqs = [_tokens(TINY, (1, 10), seed=10 + b)[0] for b in range(2)]
  B, T = len(lengths), max(lengths)
  prompt = np.zeros((B, T), np.int32)
  for b, (s, n) in enumerate(zip(seqs, lengths)):
    prompt[b, :n] = s[:n]
  run = _extend(TINY, True)
  cache = kv_cache.create(TINY, TINY.n_layers, B, MAX_LEN)
  out, cache = run(v, prompt, cache, jnp.asarray(lengths, jnp.int32))
  got = [[out.logits[b, :n]] for b, n in enumerate(lengths)]
  for t in range(6):
    step = np.array([[s[n + t]] for s, n in zip(seqs, lengths)], np.int32)
    out, cache = run(v, step, cache, jnp.ones((B,), jnp.int32))
    for b in range(B):
      got[b].append(out.logits[b])
  np.testing.assert_array_equal(cache.lengths, np.asarray(lengths) + 6)
  for b, (s, n) in enumerate(zip(seqs, lengths)):
    want = _forward(TINY)(v, s[None]).logits[0, :n + 6]   # causal: later tokens unused
    np.testing.assert_allclose(jnp.concatenate(got[b]), want, atol=1e-5, rtol=1e-5)


def test_cache_holds_only_latent_and_rope_key():
  cfg = config.deepseek_v3_671b()
  cache = jax.eval_shape(lambda: kv_cache.create(cfg, cfg.n_layers, 2, 128, "bfloat16"))
  assert cache.c_kv.shape == (cfg.n_layers, 2, 128, 512)
  assert cache.k_rope.shape == (cfg.n_layers, 2, 128, 64)
  # Every array of the cache with a token axis, counted per token (batch 2, length 128).
  stored = sum(int(np.prod(a.shape)) for a in (cache.c_kv, cache.k_rope)) // (2 * 128)
  assert stored == cache.values_per_token == (512 + 64) * 61
  assert cache.lengths.shape == (2,)
  # SPEC 1: 576 values against MHA 32,768 (1.76%), GQA 256 per group, MQA 256.
  assert kv_cache.kv_values_per_token_layer(cfg) == {
      "MLA": 576, "MHA": 32768, "GQA-8": 2048, "MQA": 256}


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda s: np.isfinite(np.asarray(filtered_logits(logits, s)))[0].tolist()
  assert keep(Sampling(1.0, top_k=2)) == [True, True, False, False, False]
  assert keep(Sampling(1.0, top_p=0.6)) == [True, True, False, False, False]
  assert keep(Sampling(1.0, top_p=0.5)) == [True, False, False, False, False]
  assert keep(Sampling(1.0, top_k=4, top_p=0.9)) == [True, True, True, True, False]


def test_speculative_sampling_keeps_the_target_distribution():
  """Monte Carlo over 200k rows: tokens emitted by the acceptance rule follow p, not q."""
  n, V = 200_000, 4
  p = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])   # target, 2 positions
  q = jnp.array([[0.4, 0.3, 0.2, 0.1]])                              # draft, 1 position
  rng_d, rng_a = jax.random.split(jax.random.PRNGKey(0))
  drafts = jax.random.categorical(rng_d, jnp.log(q[0]), shape=(n, 1)).astype(jnp.int32)
  logits = jnp.broadcast_to(jnp.log(p), (n, 2, V))
  n_acc, nxt = speculative_accept(rng_a, drafts, jnp.broadcast_to(q, (n, 1, V)), logits,
                                  Sampling(1.0))
  first = np.where(np.asarray(n_acc) == 1, np.asarray(drafts[:, 0]), np.asarray(nxt))
  freq = np.bincount(first, minlength=V) / n
  np.testing.assert_allclose(freq, p[0], atol=0.005)
  expected_accept = float(jnp.minimum(p[0], q[0]).sum())   # sum_x min(p, q)
  assert abs(float(n_acc.mean()) - expected_accept) < 0.005


# Speculative decoding on a trained model ------------------------------------------------

def _text_ids(vocab):
  """Printable ASCII of a few stdlib files, as ids 1..95 (newline 0): fits vocab 97."""
  root = sysconfig.get_paths()["stdlib"]
  text = "".join(open(f"{root}/{name}", encoding="utf-8").read()
                 for name in ("json/encoder.py", "json/decoder.py"))
  ids = np.array([ord(c) - 31 if 32 <= ord(c) < 127 else 0 for c in text], np.int32)
  assert ids.max() < vocab
  return ids


@pytest.fixture(scope="module")
def trained():
  """TINY with MTP depth 2 after 300 Adam steps on byte-level Python source: the drafts
  are right often, not always."""
  cfg = TINY
  model = Transformer(cfg)
  v = _variables(cfg)
  ids = _text_ids(cfg.vocab_size)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 300, 1e-3))
  opt = tx.init(v["params"])

  @jax.jit
  def step(params, opt, tokens):
    def loss_fn(p):
      out = model.apply({"params": p, BALANCE: v[BALANCE]}, tokens[:, :-1])
      return lm_losses(out, tokens, None, mtp_lambda=1.0)["loss"]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(0)
  params, losses = v["params"], []
  for _ in range(300):
    starts = rng.integers(0, len(ids) - 65, size=8)
    params, opt, loss = step(params, opt, ids[starts[:, None] + np.arange(65)])
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 1.0, losses[::50]
  return model, {"params": params, BALANCE: v[BALANCE]}, ids


def test_speculative_greedy_equals_plain_greedy(trained):
  model, v, ids = trained
  prompts = [ids[100:112].tolist(), ids[2000:2005].tolist(), ids[5000:5020].tolist()]
  plain = decoding.generate(model, v, prompts, max_new_tokens=24)
  spec = speculative.speculative_generate(model, v, prompts, max_new_tokens=24)
  assert spec.tokens == plain.tokens
  assert all(len(t) == 24 for t in spec.tokens)
  rate = spec.extra["accepted_fraction"]
  assert 0.0 < rate < 1.0, spec.extra
  assert len(spec.extra["acceptance_per_depth"]) == model.cfg.mtp_depth
  assert spec.extra["rounds"] < 23          # some round emitted more than one token
  # Main cache plus one latent cache per MTP module: (R + P) x (layers + depth) values.
  cfg = model.cfg
  assert plain.cache_values_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
  assert spec.cache_values_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (2 + 2)


def test_engine_speculation_on_a_trained_drafter_matches_plain_greedy(trained):
  """Served through the engine's speculative rounds (2 slots, 4 requests) at draft depth
  1, 2 (the trained modules) and 3 (the last module chained once more): every
  completion equals plain greedy, drafts are accepted (some, not all), and the slots
  need fewer steps than tokens."""
  model, v, ids = trained
  prompts = [ids[a:a + n].tolist() for a, n in ((100, 12), (2000, 5), (5000, 20), (7000, 9))]
  plain = decoding.generate(model, v, prompts, max_new_tokens=24).tokens
  for depth in (1, 2, 3):
    served = Engine(model, v, slots=2, max_len=64, page_size=8, speculative=True,
                    draft_depth=depth).serve(prompts, 24)
    assert served.tokens == plain, depth
    assert 0.0 < served.acceptance < 1.0, (depth, served.summary())
    assert served.steps < 2 * 23, (depth, served.summary())


def test_draft_depth_truncates_or_chains_the_mtp_modules():
  cfg = TINY
  model, v = Transformer(cfg), _variables(cfg)
  n_moe, D = cfg.n_moe_layers, cfg.mtp_depth
  short, v1 = speculative.with_draft_depth(model, v, 1)
  assert short.cfg.mtp_depth == 1 and "mtp_1" not in v1["params"]
  assert v1[BALANCE]["expert_bias"].shape[0] == n_moe + 1
  long, v4 = speculative.with_draft_depth(model, v, D + 2)
  assert long.cfg.mtp_depth == D + 2
  for k in (D, D + 1):
    assert v4["params"][f"mtp_{k}"] is v["params"][f"mtp_{D - 1}"]
  bias = np.asarray(v4[BALANCE]["expert_bias"])
  np.testing.assert_array_equal(bias[:n_moe + D], v[BALANCE]["expert_bias"])
  np.testing.assert_array_equal(bias[n_moe + D:], np.repeat(bias[n_moe + D - 1:][:1], 2, 0))
  with pytest.raises(ValueError, match="draft depth >= 1"):
    speculative.with_draft_depth(model, v, 0)


def test_mtp_drafts_are_the_training_forward_predictions(trained):
  """Each round's draft k is the argmax of the training forward's depth-k logits at
  position n-1 of the committed tokens followed by drafts 1..k-1 (mtp.py's chain)."""
  model, v, ids = trained
  cfg, D = model.cfg, model.cfg.mtp_depth
  lengths = [12, 5, 20]
  prompt = np.zeros((3, 32), np.int32)
  rows = []
  for b, (start, n) in enumerate(zip((100, 2000, 5000), lengths)):
    prompt[b, :n] = ids[start:start + n]
    rows.append(ids[start:start + n].tolist())
  static = dict(model=model, sampling=Sampling())
  state = speculative.spec_prefill(v, prompt, np.asarray(lengths, np.int32),
                                   jax.random.PRNGKey(0), max_len=64, **static)
  rows = [r + [int(t)] for r, t in zip(rows, state.token)]   # t[n]: committed, not run
  width = 48   # one padded length: one compile; causal, so the padding is never read
  checked = 0
  for _ in range(6):
    state, emitted, n_emitted, drafts = speculative.spec_round(v, state, **static)
    seqs = np.zeros((3, width), np.int32)
    for b, r in enumerate(rows):
      seqs[b, :len(r) + D - 1] = r + drafts[b, :D - 1].tolist()
    mtp_logits = _forward(cfg, mtp=True)(v, seqs).mtp_logits
    for b, r in enumerate(rows):
      n = len(r) - 1
      want = [int(jnp.argmax(mtp_logits[k, b, n - 1])) for k in range(D)]
      assert drafts[b].tolist() == want, (b, n)
      checked += 1
      rows[b] = r + emitted[b, :n_emitted[b]].tolist()
  assert checked == 18


def test_generation_checks_refuse_what_cannot_run_and_warn_past_the_trained_context():
  """By hand for tiny(): 3 layers + 2 MTP drafters, latent 16 + rope key 4, float32;
  2 rows, longest prompt 10 (padded to 16) + 6 new = 22 cache slots:
  2 x 22 x 5 x 20 x 4 = 17,600 bytes of cache, allowed up to half of the memory."""
  cfg = config.tiny()
  ok = decoding.check_generation(cfg, [10, 7], 6, trained_len=64, memory_bytes=35_200)
  assert ok == []
  with pytest.raises(ValueError, match=r"KV cache of 0.0 GiB for 2 row"):
    decoding.check_generation(cfg, [10, 7], 6, trained_len=64, memory_bytes=35_199)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1; got 0"):
    decoding.check_generation(cfg, [10], 0, trained_len=64)
  with pytest.raises(ValueError, match="KV cache of"):   # it used to hang without a word
    decoding.check_generation(cfg, [10], 2_000_000_000, trained_len=64)
  warn, = decoding.check_generation(cfg, [10], 60, trained_len=64, memory_bytes=2**40)
  assert "70 tokens of context" in warn and "trained at" in warn
