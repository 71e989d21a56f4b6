"""Multi-head latent attention against naive numpy loops, and its masking properties."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax.model import config, fused_attention
from deepseek_jax.model.attention import (MLA, NEG_INF, attention_mask, blockwise_attention,
                                         blockwise_latent_attention)

B, T = 2, 7

CFGS = {
    "qlora": config.tiny(),
    "qlora_yarn": config.tiny().replace(rope_factor=4.0, rope_original_max_len=16),
    "plain_q": config.tiny().replace(q_lora_rank=None),
    "plain_q_yarn": config.tiny_yarn(),  # also mscale != mscale_all_dim
    # The latent norms keep DeepSeek's eps 1e-6 whatever rms_eps says.
    "qlora_big_eps": config.tiny().replace(rms_eps=0.5),
}


def _params(cfg, seed=0):
  x = jnp.zeros((1, 4, cfg.d_model), jnp.float32)
  pos = jnp.zeros((1, 4), jnp.int32)
  # Shapes only (eval_shape): an eager init costs seconds of op-by-op compiles.
  shapes = jax.eval_shape(MLA(cfg).init, jax.random.PRNGKey(seed), x, pos)
  params = nn.unbox(shapes)["params"]
  return jax.tree.map(jnp.asarray, ref.randomize(params, seed))


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  return jax.jit(lambda p, x, pos, seg: MLA(cfg).apply({"params": p}, x, pos, seg))


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)
  pos = np.stack([np.arange(T) + 3, np.arange(T) * 2]).astype(np.int32)  # not 0..T-1
  return x, pos


@pytest.mark.parametrize("name", sorted(CFGS))
def test_mla_matches_numpy(name):
  cfg = CFGS[name]
  assert cfg.v_head_dim != cfg.qk_nope_head_dim
  p = _params(cfg)
  x, pos = _inputs(cfg)
  got = np.asarray(_apply(cfg)(p, x, pos, None))
  expected = ref.mla(jax.tree.map(np.asarray, p), x, pos, cfg)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qlora", "plain_q_yarn"])
def test_mla_with_segments_matches_numpy(name):
  cfg = CFGS[name]
  p = _params(cfg, seed=1)
  x, pos = _inputs(cfg, seed=1)
  seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 3, 3, 3]], np.int32)
  got = np.asarray(_apply(cfg)(p, x, pos, seg))
  expected = ref.mla(jax.tree.map(np.asarray, p), x, pos, cfg, seg)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qlora", "plain_q_yarn"])
def test_mla_is_causal(name):
  cfg = CFGS[name]
  p = _params(cfg, seed=2)
  x, pos = _inputs(cfg, seed=2)
  base = np.asarray(_apply(cfg)(p, x, pos, None))
  for t in range(T - 1):
    x2 = x.copy()
    x2[:, t + 1:] = np.random.default_rng(t).standard_normal(x2[:, t + 1:].shape)
    out = np.asarray(_apply(cfg)(p, x2, pos, None))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
    assert np.abs(out[:, t + 1:] - base[:, t + 1:]).min() > 1e-4


def test_segments_block_attention_across_documents():
  cfg = CFGS["qlora"]
  p = _params(cfg, seed=3)
  rng = np.random.default_rng(3)
  doc1 = rng.standard_normal((1, 3, cfg.d_model)).astype(np.float32)
  doc2 = rng.standard_normal((1, 4, cfg.d_model)).astype(np.float32)
  packed = np.concatenate([doc1, doc2], 1)
  seg = np.array([[1, 1, 1, 2, 2, 2, 2]], np.int32)
  pos = np.array([[0, 1, 2, 0, 1, 2, 3]], np.int32)
  out = np.asarray(_apply(cfg)(p, packed, pos, seg))
  alone1 = np.asarray(_apply(cfg)(p, doc1, np.arange(3)[None], None))
  alone2 = np.asarray(_apply(cfg)(p, doc2, np.arange(4)[None], None))
  np.testing.assert_allclose(out[:, :3], alone1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 3:], alone2, rtol=1e-5, atol=1e-6)
  # Without segment ids, doc 2 does see doc 1.
  mixed = np.asarray(_apply(cfg)(p, packed, pos, None))
  assert np.abs(mixed[:, 3:] - alone2).max() > 1e-3


def _eqns(jaxpr):
  """Every equation of a jaxpr, descending into sub-jaxprs (pjit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def test_softmax_runs_in_float32_under_bf16():
  cfg32 = CFGS["qlora"]
  cfg16 = cfg32.replace(dtype="bfloat16")
  p = _params(cfg32, seed=4)
  x, pos = _inputs(cfg32, seed=4)
  out16 = _apply(cfg16)(p, jnp.asarray(x, jnp.bfloat16), pos, None)
  out32 = np.asarray(_apply(cfg32)(p, x, pos, None))
  assert out16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert err < 0.03 * np.abs(out32).max(), err

  # The scores [B, N, T, S] are float32 from the score einsum through exp and the sum.
  jaxpr = jax.make_jaxpr(
      lambda p, x: MLA(cfg16).apply({"params": p}, x, pos, None))(
          p, jnp.asarray(x, jnp.bfloat16)).jaxpr
  bnts = (B, cfg16.n_heads, T, T)
  seen, casts = {}, set()
  for eqn in _eqns(jaxpr):
    for var in eqn.outvars:
      aval = var.aval
      if getattr(aval, "shape", None) == bnts:
        seen.setdefault(eqn.primitive.name, set()).add(jnp.dtype(aval.dtype))
        if eqn.primitive.name == "convert_element_type":
          casts.add((jnp.dtype(eqn.invars[0].aval.dtype), jnp.dtype(aval.dtype)))
  assert {"dot_general", "exp"} <= set(seen), seen
  for prim in ("dot_general", "exp", "max", "reduce_max", "reduce_sum", "div", "sub",
               "select_n"):
    if prim in seen:
      assert seen[prim] == {jnp.dtype(jnp.float32)}, (prim, seen)
  # The one downcast of a [B, N, T, S] array: the probabilities, for the value einsum.
  assert casts == {(jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))}, casts


# Blockwise (online-softmax) training attention against the plain path -----------------

def _seg(T):
  """Two rows of packed documents: row 0 ends in padding (segment 0, which attends only to
  itself, as in the plain path); row 1's documents start at 4 and T - 3."""
  row0 = np.zeros(T, np.int32)
  row0[:T // 3], row0[T // 3:T - 2] = 1, 2
  row1 = np.ones(T, np.int32)
  row1[4:], row1[T - 3:] = 2, 3
  return np.stack([row0, row1])


# The gradient programs' loops take seconds to compile on XLA:CPU; its backend
# optimisations buy nothing at these sizes and cost about a third of that.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _close(got, want, err_msg=""):
  """rtol 1e-5, and an atol of 1e-6 of the largest entry: the blockwise sums run in another
  order, so entries that cancel to near zero differ by float32 noise of the big ones."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(),
                             err_msg=err_msg)


@functools.lru_cache(maxsize=None)
def _value_and_grads(cfg):
  """MLA output and the gradients of <output, ct> w.r.t. params and input, jitted."""
  def f(p, x, pos, seg, ct):
    out, vjp = jax.vjp(lambda p, x: MLA(cfg).apply({"params": p}, x, pos, seg), p, x)
    return out, vjp(ct)
  return jax.jit(f, compiler_options=_FAST_COMPILE)


# T = 12 throughout: the plain reference compiles once per config and segment choice.
@pytest.mark.parametrize("name,block,segments,impl", [
    ("qlora", 4, True, "blockwise"),             # T a multiple of the block
    ("qlora", 5, True, "blockwise"),             # ragged last block
    ("qlora", 16, True, "blockwise"),            # block >= T: one block
    ("plain_q_yarn", 5, False, "blockwise"),     # no segment ids: causal only
    ("qlora", 5, True, "blockwise_latent"),      # K, V up-projected per key block
    ("plain_q_yarn", 4, False, "blockwise_latent"),
])
def test_blockwise_matches_plain(name, block, segments, impl):
  """Blockwise == plain MLA: the output and its gradients w.r.t. weights and input."""
  T = 12
  plain = CFGS[name]
  blockwise = plain.replace(attention_impl=impl, attention_block=block)
  p = _params(plain, seed=5)
  rng = np.random.default_rng(5)
  x = rng.standard_normal((B, T, plain.d_model)).astype(np.float32)
  pos = np.stack([np.arange(T), np.arange(T) * 2 + 1]).astype(np.int32)
  seg = _seg(T) if segments else None
  ct = rng.standard_normal((B, T, plain.d_model)).astype(np.float32)
  want_out, (want_dp, want_dx) = _value_and_grads(plain)(p, x, pos, seg, ct)
  got_out, (got_dp, got_dx) = _value_and_grads(blockwise)(p, x, pos, seg, ct)
  _close(got_out, want_out)
  _close(got_dx, want_dx)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_dp),
                               jax.tree.leaves(got_dp)):
    assert np.abs(want).max() > 1e-3, path  # every weight gets a real gradient
    _close(got, want, jax.tree_util.keystr(path))


def _plain_attention(q_BTNK, k_BSNK, v_BSNO, q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS):
  mask_B1TS = attention_mask(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS)
  s_BNTS = jnp.einsum("BTNK,BSNK->BNTS", q_BTNK, k_BSNK)
  p_BNTS = jax.nn.softmax(jnp.where(mask_B1TS, s_BNTS, NEG_INF), axis=-1)
  return jnp.einsum("BNTS,BSNO->BTNO", p_BNTS, v_BSNO)


def test_blockwise_attention_general_masks():
  """T != S, queries offset from the keys, a query document no key has (rows with no
  visible key: uniform over all keys, as plain), a ragged key block, skipped key blocks;
  the value and all three gradients."""
  rng = np.random.default_rng(6)
  T, S, N, K, O = 10, 11, 2, 5, 3
  q, k = (jnp.asarray(rng.standard_normal((B, L, N, K)), jnp.float32) for L in (T, S))
  v = jnp.asarray(rng.standard_normal((B, S, N, O)), jnp.float32)
  q_idx = np.stack([np.arange(T) - 3, np.arange(T) + 1]).astype(np.int32)
  k_idx = np.stack([np.arange(S), np.arange(S)]).astype(np.int32)
  q_seg = np.array([[1] * 4 + [2] * 6, [5] * 5 + [7] * 5], np.int32)
  k_seg = np.array([[1] * 5 + [2] * 6, [7] * 11], np.int32)
  visible = np.asarray(attention_mask(q_idx, k_idx, q_seg, k_seg)).any(-1)
  assert not visible[0, 0, :3].any() and not visible[1, 0, :5].any()
  assert visible.sum() >= 8
  ct = jnp.asarray(rng.standard_normal((B, T, N, O)), jnp.float32)

  def value_and_grads(attend):
    def run(q, k, v, ct):
      masked = lambda q, k, v: attend(q, k, v, q_idx, k_idx, q_seg, k_seg)
      out, vjp = jax.vjp(masked, q, k, v)
      return out, vjp(ct)
    return jax.jit(run, compiler_options=_FAST_COMPILE)(q, k, v, ct)

  want, want_grads = value_and_grads(_plain_attention)
  got, got_grads = value_and_grads(functools.partial(blockwise_attention, block=4))
  _close(got, want)
  for g, w in zip(got_grads, want_grads):
    _close(g, w)


def test_blockwise_attention_under_bf16():
  """bfloat16 in, bfloat16 out, near the float32 answer; every exp runs in float32."""
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.standard_normal((B, 9, 2, 4)), jnp.float32) for _ in range(3))
  idx = np.broadcast_to(np.arange(9), (B, 9))
  want = _plain_attention(q, k, v, idx, idx, None, None)
  bf16 = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  attend = lambda q, k, v: blockwise_attention(q, k, v, idx, idx, block=4)
  got = jax.jit(attend)(*bf16)
  assert got.dtype == jnp.bfloat16
  assert np.abs(np.asarray(got, np.float32) - want).max() < 0.03
  exps = {jnp.dtype(v.aval.dtype) for eqn in _eqns(jax.make_jaxpr(attend)(*bf16).jaxpr)
          if eqn.primitive.name == "exp" for v in eqn.outvars}
  assert exps == {jnp.dtype(jnp.float32)}, exps


def test_blockwise_gradient_has_no_full_score_tensor():
  """The backward of the blockwise MLA (T = 48, blocks of 8) holds nothing [.., T, .., S]
  and nothing bigger than the layer's activations (x, q, k, v): no scores, no residuals
  of all query blocks at once (what dropping the jax.checkpoint gives), no per-query-block
  copy of K. The plain path fails the same check (its [B, N, T, S] scores)."""
  T = 48
  assert T not in dataclasses.astuple(CFGS["qlora"])  # no other size is mistaken for T
  x = jnp.zeros((B, T, CFGS["qlora"].d_model), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  p = _params(CFGS["qlora"])

  def offenders(cfg):
    loss = lambda p, x: MLA(cfg).apply({"params": p}, x, pos, pos % 5).sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(p, x).jaxpr
    biggest = B * T * max(cfg.d_model, cfg.n_heads * cfg.qk_head_dim,
                          cfg.n_heads * cfg.v_head_dim)
    return {tuple(v.aval.shape) for eqn in _eqns(jaxpr) for v in eqn.outvars
            if list(getattr(v.aval, "shape", ())).count(T) >= 2
            or np.prod(getattr(v.aval, "shape", ())) > biggest}

  plain = CFGS["qlora"]
  assert (B, plain.n_heads, T, T) in offenders(plain)
  assert offenders(plain.replace(attention_impl="blockwise", attention_block=8)) == set()
  assert offenders(plain.replace(attention_impl="blockwise_latent", attention_block=8)) == set()


def test_blockwise_latent_never_holds_the_whole_sequences_keys():
  """blockwise_latent_attention (8 queries at the end of 48 keys, blocks of 8) equals
  blockwise_attention on the expanded K and V, value and gradients, and its forward and
  backward hold K and V one key block at a time: no value of per-head keys or values
  covering the 48 positions (whole, or as 6 stacked blocks), which blockwise has."""
  rng = np.random.default_rng(3)
  T, S, N, H, P, O, R = 8, 48, 2, 4, 3, 5, 6
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, c_kv, k_rope, w_uk, w_uv = f(B, T, N, H + P), f(B, S, R), f(B, S, P), f(R, N, H), f(R, N, O)
  q_idx = np.broadcast_to(np.arange(S - T, S), (B, T)).astype(np.int32)
  k_idx = np.broadcast_to(np.arange(S), (B, S)).astype(np.int32)
  seg = np.broadcast_to((np.arange(S) >= 20) + 1, (B, S)).astype(np.int32)

  def expanded(q, c_kv, k_rope, w_uk, w_uv):
    k = jnp.concatenate([jnp.einsum("BSR,RNH->BSNH", c_kv, w_uk),
                         jnp.broadcast_to(k_rope[:, :, None], (B, S, N, P))], -1)
    v = jnp.einsum("BSR,RNO->BSNO", c_kv, w_uv)
    return blockwise_attention(q, k, v, q_idx, k_idx, seg[:, S - T:], seg, block=8)

  latent = lambda q, c_kv, k_rope, w_uk, w_uv: blockwise_latent_attention(
      q, c_kv, k_rope, w_uk, w_uv, q_idx, k_idx, seg[:, S - T:], seg, block=8)
  args = (q, c_kv, k_rope, w_uk, w_uv)
  ct = f(B, T, N, O)
  grads = lambda fn: jax.vjp(fn, *args)[1](ct)
  _close(jax.jit(latent)(*args), jax.jit(expanded)(*args))
  for g, w in zip(jax.jit(lambda: grads(latent))(), jax.jit(lambda: grads(expanded))()):
    _close(g, w)

  def whole_keys(fn):
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1](ct))(*args).jaxpr
    return {tuple(v.aval.shape) for eqn in _eqns(jaxpr) for v in eqn.outvars
            if len(getattr(v.aval, "shape", ())) >= 3 and v.aval.shape[-2] == N
            and v.aval.shape[-1] in (H + P, O) and np.prod(v.aval.shape[:-2]) >= B * S}

  assert (B, S, N, H + P) in whole_keys(expanded)
  assert whole_keys(latent) == set()


# Fused (GPU) attention: the masking and V padding checked on CPU through each library's
# XLA implementation, the same API call the GPU kernels get.

@pytest.mark.parametrize("library", fused_attention.LIBRARIES)
@pytest.mark.parametrize("segments", [True, False])
def test_fused_attention_matches_plain(library, segments):
  """Causal + same-document masking and MLA's unequal head dims (K = 5 > O = 3: cuDNN's
  V is padded and sliced): the value and the gradients w.r.t. q, k and v."""
  rng = np.random.default_rng(8)
  T, N, K, O = 9, 2, 5, 3
  q, k = (jnp.asarray(rng.standard_normal((B, T, N, K)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((B, T, N, O)), jnp.float32)
  idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  seg = np.array([[1] * 4 + [2] * 5, [3] * 2 + [4] * 7], np.int32) if segments else None
  ct = jnp.asarray(rng.standard_normal((B, T, N, O)), jnp.float32)

  def value_and_grads(attend):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(ct)

  want, want_grads = value_and_grads(
      lambda q, k, v: _plain_attention(q, k, v, idx, idx, seg, seg))
  got, got_grads = value_and_grads(functools.partial(
      fused_attention.fused_attention, seg_BT=seg, library=library, implementation="xla"))
  assert got.shape == (B, T, N, O)
  _close(got, want)
  for g, w in zip(got_grads, want_grads):
    _close(g, w)
  if segments:  # the document mask is live: without it the first rows of doc 2 differ
    unmasked = _plain_attention(q, k, v, idx, idx, None, None)
    assert np.abs(np.asarray(unmasked - want)[0, 4:]).max() > 1e-2


def test_mla_through_tokamax_matches_plain():
  """attention_impl="tokamax" in the model (on CPU tokamax picks its XLA path): the MLA
  output and every gradient equal the plain path's, packed documents on."""
  T = 12
  plain = CFGS["qlora"]
  fused = plain.replace(attention_impl="tokamax")
  p = _params(plain, seed=9)
  rng = np.random.default_rng(9)
  x = rng.standard_normal((B, T, plain.d_model)).astype(np.float32)
  pos = np.stack([np.arange(T), np.arange(T) * 2 + 1]).astype(np.int32)
  ct = rng.standard_normal((B, T, plain.d_model)).astype(np.float32)
  want_out, (want_dp, want_dx) = _value_and_grads(plain)(p, x, pos, _seg(T), ct)
  got_out, (got_dp, got_dx) = _value_and_grads(fused)(p, x, pos, _seg(T), ct)
  _close(got_out, want_out)
  _close(got_dx, want_dx)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_dp),
                               jax.tree.leaves(got_dp)):
    _close(got, want, jax.tree_util.keystr(path))


def test_cudnn_attention_needs_half_precision():
  with pytest.raises(ValueError, match="attention_impl.*bfloat16"):
    config.tiny().replace(attention_impl="cudnn")
  assert config.tiny().replace(attention_impl="cudnn", dtype="bfloat16").dtype == "bfloat16"
