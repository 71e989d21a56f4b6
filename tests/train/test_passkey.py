"""Passkey retrieval (train/passkey.py): the prompts and the scoring."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.train import passkey
from deepseek_jax.data.tokenizers import ByteTokenizer


def test_prompt_has_the_length_the_key_at_its_depth_and_the_answer_last():
  tok = ByteTokenizer()
  for depth in (0.0, 0.5, 1.0):
    ids, n_answer = passkey.prompt(tok, 300, depth, "04217")
    text = tok.decode(ids)
    assert len(ids) == 300 and n_answer == 6
    assert text.endswith("The pass key is 04217")
    where = text.index("The pass key is 04217.")
    filler = len(passkey.FILLER)
    n_fill = 300 - len(passkey.KEY.format(key="04217")) - len(passkey.QUESTION) - 6
    assert (n_fill - where) % filler == 0   # after a whole filler sentence
    assert where == n_fill - int((1 - depth) * n_fill) // filler * filler
    assert text[:-len("The pass key is 04217")].endswith(passkey.FILLER if depth < 1
                                                         else passkey.KEY.format(key="04217"))
  with pytest.raises(ValueError, match="at least 44 tokens"):
    passkey.prompt(tok, 40, 0.5, "04217")


def test_prompts_spread_depths_and_draw_keys_by_seed():
  tok = ByteTokenizer()
  ids, n_answer, keys = passkey.prompts(tok, 200, 5, seed=3)
  assert ids.shape == (5, 200) and list(n_answer) == [6] * 5
  starts = [tok.decode(row).index(f"key is {k}.") for row, k in zip(ids, keys)]
  assert starts == sorted(starts) and starts[0] < starts[-1]
  assert passkey.prompts(tok, 200, 5, seed=3)[2] == keys
  assert passkey.prompts(tok, 200, 5, seed=4)[2] != keys


def _oracle_logits(ids_BT, wrong_rows=(), vocab=258):
  """Logits that predict each next token exactly, except one answer digit of the rows
  in wrong_rows."""
  B, T = ids_BT.shape
  nxt = np.concatenate([ids_BT[:, 1:], np.zeros((B, 1), ids_BT.dtype)], axis=1)
  for b in wrong_rows:
    nxt[b, T - 3] = (nxt[b, T - 3] + 1) % vocab
  return jnp.asarray(np.eye(vocab, dtype=np.float32)[nxt])


def test_score_counts_a_prompt_only_when_every_answer_token_is_predicted():
  tok = ByteTokenizer()
  calls = []

  def apply_fn(ids):
    calls.append(ids.shape)
    return _oracle_logits(np.asarray(ids), wrong_rows=(1, 3))

  out = passkey.score(apply_fn, tok, [64, 120], n=4)
  assert calls == [(4, 64), (4, 120)]
  for length in (64, 120):
    assert out[length]["accuracy"] == 0.5
    assert out[length]["token_accuracy"] == pytest.approx((4 * 6 - 2) / 24)
  # A filler mistake outside the answer does not count.
  ids, n_answer, _ = passkey.prompts(tok, 100, 2)
  logits = np.array(_oracle_logits(ids))
  logits[:, 10] = np.roll(logits[:, 10], 1, axis=-1)
  exact, hits, total = passkey.answer_hits(jnp.asarray(logits), jnp.asarray(ids),
                                           jnp.asarray(n_answer))
  assert list(np.asarray(exact)) == [True, True] and list(np.asarray(hits)) == [6, 6]
