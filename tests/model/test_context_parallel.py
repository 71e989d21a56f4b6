"""Context parallelism on 8 simulated CPU devices: the model's loss, logits and every
gradient with each sequence split over the mesh's "context" axis (2, 4, 8 shards, and
beside data / fsdp / expert / tensor axes) equal the unsharded model's in float32, with
packed documents that cross shard boundaries, positions that restart per document,
MTP on, YaRN on, and the training attentions (plain, blockwise, blockwise_latent); the
zig-zag layout and its balance; the gathered operand is the latent, R + P wide."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import config, context_parallel
from deepseek_jax.model.transformer import Transformer, init_variables
from deepseek_jax.train import losses, sharding

B, T = 4, 16
CFG = config.tiny()
YARN = config.tiny_yarn()   # no q compression, YaRN, softmax routing


def _batch(seed=0):
  """tokens [B, T+1] with documents packed across the row: boundaries at positions that
  are not multiples of T / 8, so documents cross every shard boundary."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  segments = np.ones((B, T + 1), np.int32)
  for row, cuts in enumerate([(5,), (3, 11), (), (7, 9, 13)]):
    for c in cuts:
      segments[row, c:] += 1
  segments[2, 14:] = 0            # padding at the end of one row
  positions = np.zeros_like(segments)
  for row in range(B):
    for s in np.unique(segments[row]):
      where = np.flatnonzero(segments[row] == s)
      positions[row, where] = np.arange(len(where))
  return tokens, segments, positions


@functools.lru_cache(maxsize=None)
def _loss_and_grads(cfg):
  model = Transformer(cfg)

  def loss(params, balance, tokens, segments, positions):
    out = model.apply({"params": params, "balance": balance}, tokens[:, :-1],
                      positions[:, :-1], segments[:, :-1])
    result = losses.lm_losses(out, tokens, segments)
    return result["loss"], out.logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _run(cfg, mesh=None):
  variables = init_variables(Transformer(cfg), jax.random.PRNGKey(1), 1, T)
  balance = jax.tree.map(lambda b: 0.1 * jnp.arange(b.size, dtype=jnp.float32).reshape(
      b.shape) % 0.3, variables["balance"])
  args = (variables["params"], balance) + _batch()
  if mesh is None:
    return _loss_and_grads(cfg)(*args)
  with jax.set_mesh(mesh):
    return _loss_and_grads(cfg)(*args)


def _mesh(**axes):
  sizes = {**dict(data=1, fsdp=1, expert=1, context=1, tensor=1), **axes}
  return sharding.make_mesh(sizes, jax.devices()[:8])


def _assert_same(cfg, mesh):
  (loss0, logits0), g0 = _run(cfg)
  (loss1, logits1), g1 = _run(cfg, mesh)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("n", [2, 4])
def test_zigzag_layout_puts_chunks_i_and_2n_minus_1_minus_i_on_shard_i(n):
  """to_zigzag moves [B, T] so that shard i holds chunks i and 2n-1-i (in the order
  zigzag_index gives); from_zigzag brings it back, and its gradient is the inverse."""
  mesh = _mesh(context=n, data=8 // n)
  x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
  order = context_parallel.zigzag_index(16, n)
  c = 16 // (2 * n)
  assert list(order[:2 * c]) == list(range(c)) + list(range((2 * n - 1) * c, 2 * n * c))
  with jax.set_mesh(mesh):
    z = jax.jit(context_parallel.to_zigzag)(x)
    back = jax.jit(context_parallel.from_zigzag)(z)
    g = jax.jit(jax.grad(lambda a: jnp.sum(context_parallel.to_zigzag(a) * z)))(x)
  np.testing.assert_array_equal(z, x[:, order])
  np.testing.assert_array_equal(back, x)
  np.testing.assert_array_equal(g, x)   # d/da sum(P(a) * P(x)) = P^T P x = x
  with pytest.raises(ValueError, match="divisible by 2 x context"):
    context_parallel.zigzag_index(12, 4)


def test_zigzag_balances_the_blockwise_causal_work():
  """Live (query block, key block) tiles per shard: contiguous shards grow with their
  index; the zig-zag layout gives every shard the same count."""
  contiguous = context_parallel.shard_live_tiles(32768, 4, 512, zigzag=False)
  zigzag = context_parallel.shard_live_tiles(32768, 4, 512, zigzag=True)
  assert contiguous[0] < contiguous[1] < contiguous[2] < contiguous[3]
  assert len(set(zigzag)) == 1 and sum(zigzag) == sum(contiguous)
  # The whole causal triangle of 64 blocks: 64 x 65 / 2 tiles.
  assert sum(zigzag) == 64 * 65 // 2


@pytest.mark.parametrize("impl", ["plain", "blockwise"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_context_shards_match_one_device(n, impl):
  cfg = CFG.replace(attention_impl=impl, attention_block=4)
  _assert_same(cfg, _mesh(context=n, data=8 // n))


@pytest.mark.parametrize("axes", [dict(data=2, context=2, tensor=2),
                                  dict(fsdp=2, context=2, expert=2),
                                  dict(context=2, expert=2, tensor=2)],
                         ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_context_beside_other_axes_matches_one_device(axes):
  _assert_same(YARN.replace(attention_impl="blockwise", attention_block=4), _mesh(**axes))


def test_blockwise_latent_under_context_matches_one_device():
  """The 128K stage's attention (K and V up-projected per key block) at context 4 beside
  tensor 2, against the one-device plain model."""
  cfg = YARN.replace(attention_impl="blockwise_latent", attention_block=4)
  (loss0, logits0), g0 = _run(YARN)
  (loss1, logits1), g1 = _run(cfg, _mesh(context=4, tensor=2))
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_the_gathered_operand_is_the_latent():
  """The context all-gather moves [B, T, R + P] (the latent and the rope key), nothing
  per head: read from the compiled program's collectives."""
  mesh = _mesh(context=4, data=2)
  variables = init_variables(Transformer(CFG), jax.random.PRNGKey(1), 1, T)
  with jax.set_mesh(mesh):
    hlo = _loss_and_grads(CFG).lower(variables["params"], variables["balance"],
                                     *_batch()).compile().as_text()
  width = CFG.kv_lora_rank + CFG.qk_rope_head_dim
  # The forward's gathers. (The backward of the MTP block's W_O still gathers its
  # [b, T, N, O] input: BUILD_NOTES.md, "Limits".)
  gathers = [line for line in hlo.splitlines()
             if " all-gather(" in line and "transpose(" not in line]
  latent = [g for g in gathers if f",{width}]" in g.split("all-gather(")[0]]
  assert latent, "no all-gather of the latent:\n" + "\n".join(gathers)
  per_head = CFG.n_heads * CFG.qk_head_dim
  assert not [g for g in gathers if f",{per_head}]" in g.split("all-gather(")[0]
              or f",{CFG.n_heads},{CFG.qk_head_dim}]" in g.split("all-gather(")[0]]
