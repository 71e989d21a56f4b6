"""Passkey retrieval: can the model find a number hidden in filler text of a given length?

The test of Mohtashami and Jaggi (2023, "Landmark Attention"), used for YaRN and for
DeepSeek's long-context checks: a five-digit key sits at some depth of a repeated filler
("The grass is green. The sky is blue. ..."), and the prompt ends by asking for it. A
prompt of L tokens is scored by one forward pass: it passes when the model's argmax at
every answer position is the key's next token, which is exactly when greedy decoding
after the question would write the key. Nothing is sampled and nothing downloads; the
run's own tokenizer writes the prompts, so any run (bytes or BPE) can be scored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
# Shorter than the paper's wording so that a prompt fits in 64 byte tokens (44 bytes
# without filler): the toy pre-training context can then be scored too.
KEY = "The pass key is {key}. "
QUESTION = "The pass key is"
ANSWER = " {key}"


def prompt(tokenizer, length: int, depth: float, key: str) -> tuple[np.ndarray, int]:
  """(ids [length] int32, n_answer): filler with KEY at `depth` (0 = first, 1 = just
  before the question, after a whole filler sentence), then QUESTION and the answer,
  whose tokens are the last n_answer. Raises ValueError if `length` cannot hold it."""
  enc = lambda text: list(tokenizer.encode_batch([text])[0])
  question, answer = enc(QUESTION), enc(QUESTION + ANSWER.format(key=key))
  if answer[:len(question)] != question:   # a BPE merge across the boundary
    raise ValueError("the tokenizer merges the question with the answer")
  answer = answer[len(question):]
  needle, filler = enc(KEY.format(key=key)), enc(FILLER)
  n_fill = length - len(needle) - len(question) - len(answer)
  if n_fill < 0:
    raise ValueError(f"a passkey prompt needs at least "
                     f"{length - n_fill} tokens with this tokenizer; got length={length}")
  # The filler ends on a whole sentence (any partial one comes first), and the key goes
  # in on a sentence boundary: cut = n_fill - a whole number of sentences.
  L = len(filler)
  fill = (filler * (n_fill // L + 1))[len(filler) * (n_fill // L + 1) - n_fill:]
  cut = n_fill - int((1.0 - depth) * n_fill) // L * L
  ids = fill[:cut] + needle + fill[cut:] + question + answer
  return np.asarray(ids, np.int32), len(answer)


def prompts(tokenizer, length: int, n: int, seed: int = 0):
  """(ids [n, length], n_answer [n], keys): n prompts with random keys at depths spread
  evenly over [0, 1]."""
  rng = np.random.default_rng([seed, length])
  keys = [f"{k:05d}" for k in rng.integers(0, 100_000, n)]
  depths = np.linspace(0.0, 1.0, n) if n > 1 else [0.5]
  rows = [prompt(tokenizer, length, d, k) for d, k in zip(depths, keys)]
  return (np.stack([r[0] for r in rows]), np.asarray([r[1] for r in rows], np.int32), keys)


def answer_hits(logits_BTV, ids_BT, n_answer_B):
  """Per prompt: (all answer tokens argmax-predicted [B] bool, tokens predicted [B],
  answer tokens [B]). The token at position i is predicted by the logits at i - 1."""
  B, T = ids_BT.shape
  pred_BT = jnp.argmax(logits_BTV[:, :-1], axis=-1) == ids_BT[:, 1:]
  in_answer_BT = jnp.arange(1, T)[None, :] >= (T - n_answer_B)[:, None]
  hits_B = jnp.sum(pred_BT & in_answer_BT, axis=-1)
  return hits_B == n_answer_B, hits_B, n_answer_B


def score(apply_fn, tokenizer, lengths, n: int = 16, seed: int = 0) -> dict:
  """{length: {"accuracy", "token_accuracy", "n"}} for apply_fn(ids [B, T]) -> logits."""
  out = {}
  for length in lengths:
    ids, n_answer, _ = prompts(tokenizer, length, n, seed)
    logits = apply_fn(jnp.asarray(ids))
    exact, hits, total = jax.device_get(answer_hits(logits, jnp.asarray(ids),
                                                    jnp.asarray(n_answer)))
    out[int(length)] = {"accuracy": float(np.mean(exact)),
                        "token_accuracy": float(np.sum(hits) / np.sum(total)), "n": n}
  return out


def evaluate_passkey(workdir: str, lengths, n: int = 16, step: int | None = None,
                     seed: int = 0) -> dict:
  """Passkey accuracy by length of a run's checkpoint (its model config as trained:
  an extension stage's YaRN included), on one device."""
  from deepseek_jax.data import corpus as corpus_lib
  from deepseek_jax.train.evaluation import restore_state
  from deepseek_jax.train.step import model_variables
  model, state, run_cfg, step, _ = restore_state(workdir, step)
  tokenizer = corpus_lib.load_tokenizer(run_cfg.data, model.cfg.vocab_size)
  variables = model_variables(state.params, state.expert_bias)
  forward = jax.jit(lambda v, ids: model.apply(v, ids, mtp=False).logits)
  return {"workdir": workdir, "step": step, "seq_len": int(run_cfg.seq_len),
          "rope_factor": float(model.cfg.rope_factor),
          "lengths": score(lambda ids: forward(variables, ids), tokenizer, lengths, n, seed)}
