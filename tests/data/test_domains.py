"""Domains in the data: the embedded code / prose / structured domains, and batches whose
micro-batches each hold one domain (data.composition = "single_domain")."""


import numpy as np
import pytest

from configs import common
from deepseek_jax.data import corpus as corpus_lib
from deepseek_jax.data import domains
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import batches as batches_lib
from deepseek_jax.train.step import split_microbatches


def _mixture(K=3, seq_len=7, seed=0):
  """K sources whose tokens name them: source k's tokens lie in [100 k, 100 k + 50)."""
  rng = np.random.default_rng(0)
  sources = []
  for k in range(K):
    n = 400 + 37 * k   # different lengths: each source wraps at its own pace
    tokens = 100 * k + rng.integers(0, 50, n)
    sources.append(batches_lib.PackedRows(tokens, np.arange(0, n, 20), seq_len=seq_len))
  return batches_lib.Mixture(sources, [1.0] * K, seed)


def test_single_domain_micro_batches_hold_one_domain_and_rotate():
  """batch 12 in 4 micro-batches (the train step's strided split): each micro-batch's
  rows come from one source, source (step x 4 + m) mod 3, over 7 steps every source
  serves the same number of micro-batches, and a source's rows do not repeat before it
  has run through its stream."""
  mix, B, M = _mixture(), 12, 4
  schedule = batches_lib.BatchSchedule(mix, B, seed=0, composition="single_domain", microbatches=M)
  seen = {k: [] for k in range(3)}
  served = np.zeros(3, int)
  for step in range(7):
    micro = split_microbatches(schedule.batch(step), M)["tokens"]
    for m in range(M):
      k = set((np.asarray(micro[m]) // 100).ravel().tolist())
      assert k == {(step * M + m) % 3}, (step, m, k)
      served[(step * M + m) % 3] += 1
      seen[(step * M + m) % 3] += [tuple(r) for r in np.asarray(micro[m])]
  assert served.max() - served.min() <= 1
  for k, rows in seen.items():
    assert len(set(rows)) == len(rows), k   # fewer rows than a source holds: no repeats


def test_single_domain_batches_are_a_pure_function_of_the_step():
  """A fresh schedule (a resumed run) gives the same batches, and 2 processes' slices
  (or 4) put together are the 1-process batch: resuming on another slice is exact."""
  B, M = 12, 4
  one = batches_lib.BatchSchedule(_mixture(), B, 0, composition="single_domain", microbatches=M)
  again = batches_lib.BatchSchedule(_mixture(), B, 0, composition="single_domain", microbatches=M)
  for step in (0, 5, 9):
    whole = one.batch(step)
    np.testing.assert_array_equal(again.batch(step)["tokens"], whole["tokens"])
    for n in (2, 4):
      parts = [one.batch(step, i, n) for i in range(n)]
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  mixed = batches_lib.BatchSchedule(_mixture(), B, 0)
  kinds = {len(set((np.asarray(r) // 100).ravel().tolist())) for r in
           split_microbatches(mixed.batch(1), M)["tokens"]}
  assert max(kinds) > 1   # "mixed" micro-batches hold several domains


def test_single_domain_refuses_what_cannot_compose():
  one = batches_lib.PackedRows(np.arange(200), np.arange(0, 200, 20), seq_len=7)
  with pytest.raises(ValueError, match="needs several sources"):
    batches_lib.BatchSchedule(one, 8, 0, composition="single_domain", microbatches=2)
  with pytest.raises(ValueError, match="divisible by an explicit microbatches"):
    batches_lib.BatchSchedule(_mixture(), 10, 0, composition="single_domain", microbatches=4)
  with pytest.raises(ValueError, match="composition must be one of"):
    batches_lib.BatchSchedule(_mixture(), 8, 0, composition="shuffled")


def test_embedded_domains_are_built_prepared_and_differ(tmp_path):
  """source="domains": three prepared sources named code, prose, structured, in bytes;
  what each holds looks like its name (code without docstrings, prose in sentences,
  tab-separated tables)."""
  cfg = common.base_config(ModelConfig(vocab_size=257))
  cfg.data.source, cfg.data.tokenizer = "domains", "bytes"
  cfg.data.cache_dir = str(tmp_path)
  cfg.data.domain_bytes = 40_000
  corpus = corpus_lib.load_corpus(cfg.data, 257)
  assert corpus.names == list(domains.DOMAINS) and len(corpus.train) == 3
  text = {}
  for name, stream in zip(corpus.names, corpus.train):
    ids = np.asarray(stream.read(0, min(len(stream), 20_000)))
    text[name] = bytes(int(i) for i in ids if i < 256).decode("utf-8", "replace")
  assert "def " in text["code"] and '"""' not in text["code"]
  assert text["structured"].count("\t") > 100 and "LATIN" in text["structured"]
  words = text["prose"].split()
  assert len(words) > 1000 and text["prose"].count(". ") > 20
  assert text["prose"].count("\t") < text["structured"].count("\t") / 50
  cfg.data.tokenizer = "bpe"
  with pytest.raises(ValueError, match="needs data.tokenizer='bytes'"):
    corpus_lib.load_corpus(cfg.data, 257)
