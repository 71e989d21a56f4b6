"""Cross-entropy, depth targets across packed documents, and the MTP-weighted total."""

import jax.numpy as jnp
import numpy as np
import pytest

import reference_numpy as ref
from deepseek_jax.train import losses
from deepseek_jax.model.transformer import ModelOutput

V = 11


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((3, 5, V)) * 4).astype(np.float32)
  targets = rng.integers(0, V, size=(3, 5))
  weights = rng.uniform(size=(3, 5)).astype(np.float32)
  weights[0, :2] = 0.0
  total, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                  jnp.asarray(weights))
  expected_total, expected_n = ref.cross_entropy(logits, targets, weights)
  assert total.dtype == jnp.float32
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)
  np.testing.assert_allclose(n, expected_n, rtol=1e-6)
  # bf16 logits are upcast before the logsumexp.
  total16, _ = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                                    jnp.asarray(weights))
  assert total16.dtype == jnp.float32
  np.testing.assert_allclose(total16, expected_total, rtol=2e-2)


def test_cross_entropy_is_stable_for_large_logits():
  logits = np.zeros((1, 2, V), np.float32)
  logits[0, 0, 3] = 1e4
  logits[0, 1, 5] = -1e4
  total, _ = losses.cross_entropy(jnp.asarray(logits), jnp.array([[3, 5]]), jnp.ones((1, 2)))
  expected, _ = ref.cross_entropy(logits, np.array([[3, 5]]), np.ones((1, 2)))
  assert np.isfinite(float(total))
  np.testing.assert_allclose(total, expected, rtol=1e-5)


# Row 0 packs document 1 (4 tokens), document 2 (3 tokens) and 2 padding tokens;
# row 1 is one document followed by the start of another.
TOKENS = np.array([[10, 11, 12, 13, 20, 21, 22, 0, 0],
                   [30, 31, 32, 33, 34, 35, 36, 40, 41]], np.int32)
SEGS = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0],
                 [1, 1, 1, 1, 1, 1, 1, 2, 2]], np.int32)


def test_depth_targets_by_hand():
  targets, weights = losses.depth_targets(jnp.asarray(TOKENS), jnp.asarray(SEGS), 0)
  np.testing.assert_array_equal(weights, [[1, 1, 1, 0, 1, 1, 0, 0],
                                          [1, 1, 1, 1, 1, 1, 0, 1]])
  np.testing.assert_array_equal(np.where(weights, targets, -1),
                                [[11, 12, 13, -1, 21, 22, -1, -1],
                                 [31, 32, 33, 34, 35, 36, -1, 41]])
  targets, weights = losses.depth_targets(jnp.asarray(TOKENS), jnp.asarray(SEGS), 1)
  np.testing.assert_array_equal(weights, [[1, 1, 0, 0, 1, 0, 0, 0],
                                          [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(np.where(weights, targets, -1),
                                [[12, 13, -1, -1, 22, -1, -1, -1],
                                 [32, 33, 34, 35, 36, -1, -1, -1]])
  # Without segment ids every existing target counts.
  targets, weights = losses.depth_targets(jnp.asarray(TOKENS), None, 2)
  np.testing.assert_array_equal(weights, [[1] * 6 + [0] * 2] * 2)
  np.testing.assert_array_equal(targets[:, :6], TOKENS[:, 3:])


def test_depth_targets_across_documents_by_hand():
  """V3's packing (no document mask): the boundary transitions are targets too (13 -> 20,
  36 -> 40), padding still is not."""
  targets, weights = losses.depth_targets(jnp.asarray(TOKENS), jnp.asarray(SEGS), 0,
                                          same_document=False)
  np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 1, 1, 0, 0],
                                          [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(np.where(weights, targets, -1),
                                [[11, 12, 13, 20, 21, 22, -1, -1],
                                 [31, 32, 33, 34, 35, 36, 40, 41]])
  targets, weights = losses.depth_targets(jnp.asarray(TOKENS), jnp.asarray(SEGS), 1,
                                          same_document=False)
  np.testing.assert_array_equal(np.where(weights, targets, -1),
                                [[12, 13, 20, 21, 22, -1, -1, -1],
                                 [32, 33, 34, 35, 36, 40, 41, -1]])


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_depth_targets_never_cross_documents(k):
  rng = np.random.default_rng(k)
  B, T1 = 4, 17
  tokens = rng.integers(1, 50, size=(B, T1))
  segs = np.zeros((B, T1), np.int32)
  for b in range(B):  # random document lengths, then padding
    cuts = np.sort(rng.choice(np.arange(1, T1), size=3, replace=False))
    segs[b, :cuts[0]] = 1
    segs[b, cuts[0]:cuts[1]] = 2
    segs[b, cuts[1]:cuts[2]] = 3
  targets, weights = losses.depth_targets(jnp.asarray(tokens), jnp.asarray(segs), k)
  targets, weights = np.asarray(targets), np.asarray(weights)
  ref_targets, ref_weights = ref.depth_targets(tokens, segs, k)
  np.testing.assert_array_equal(weights, ref_weights)
  np.testing.assert_array_equal(targets[weights], ref_targets[weights])
  for b, i in zip(*np.nonzero(weights)):
    assert segs[b, i] != 0 and segs[b, i + k + 1] == segs[b, i]
    assert targets[b, i] == tokens[b, i + k + 1]
  assert weights.sum() > 0


def _output(seed, depth):
  rng = np.random.default_rng(seed)
  B, T = TOKENS.shape[0], TOKENS.shape[1] - 1
  vocab = TOKENS.max() + 1
  logits = (rng.standard_normal((B, T, vocab)) * 2).astype(np.float32)
  mtp = (rng.standard_normal((depth, B, T, vocab)) * 2).astype(np.float32) if depth else None
  out = ModelOutput(logits=jnp.asarray(logits), mtp_logits=None if mtp is None
                    else jnp.asarray(mtp), moe=None, hidden=jnp.zeros((B, T, 4)))
  return out, logits, mtp


@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("depth,lam", [(1, 0.3), (2, 0.1), (3, 1.0)])
def test_lm_losses_total(segments, depth, lam):
  out, logits, mtp = _output(depth, depth)
  segs = SEGS if segments else None
  got = losses.lm_losses(out, jnp.asarray(TOKENS), None if segs is None else jnp.asarray(segs),
                         mtp_lambda=lam)
  ce, per_depth, total = ref.lm_loss(logits, mtp, TOKENS, segs, lam)
  np.testing.assert_allclose(got["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(got["mtp"], per_depth, rtol=1e-5)
  np.testing.assert_allclose(got["mtp_total"], lam / depth * sum(per_depth), rtol=1e-5)
  np.testing.assert_allclose(got["loss"], total, rtol=1e-5)
  np.testing.assert_allclose(got["n_tokens"], 12 if segments else 16)


def test_lm_losses_without_mtp_is_plain_ce():
  out, logits, _ = _output(7, 0)
  got = losses.lm_losses(out, jnp.asarray(TOKENS), jnp.asarray(SEGS))
  t, w = ref.depth_targets(TOKENS, SEGS, 0)
  s, n = ref.cross_entropy(logits, t, w)
  np.testing.assert_allclose(got["loss"], s / n, rtol=1e-5)
  np.testing.assert_allclose(got["ce"], s / n, rtol=1e-5)
  assert "mtp" not in got
