"""Prepared data: experiments.prepare_data's shards, their reader, and bad input."""

import bisect
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax.data import corpus as corpus_lib
from deepseek_jax.data import inputs, prepare, shards
from deepseek_jax.train import batches as batches_lib
from train_helpers import subprocess_env


def _corpus(tmp_path, n_json=30, n_txt=5):
  """Two jsonl files (one with a malformed line, an empty text and a record without the
  field) and a few text files (one empty); the documents as (name, text) in order."""
  root = tmp_path / "in"
  root.mkdir()
  docs = []
  for f in range(2):
    lines = []
    for i in range(n_json):
      text = f"file {f} record {i}: " + "naïve text " * (i % 7 + 1)
      lines.append(json.dumps({"text": text, "id": i}))
      docs.append((f"a{f}.jsonl#{i + 1}", text))
    (root / f"a{f}.jsonl").write_text("\n".join(lines) + "\n")
  with open(root / "a1.jsonl", "a") as fh:
    fh.write('{"text": "half a rec\n{"text": ""}\n{"body": "no text field"}\n')
  for i in range(n_txt):
    text = "" if i == 2 else f"plain document {i}\n" * (i + 3)
    (root / f"t{i}.txt").write_text(text)
    if text:
      docs.append((f"t{i}.txt", text))
  return root, docs


def _bytes_stream(docs, val_fraction, split):
  """The expected stream, by hand: UTF-8 bytes of each document of the split, then 256."""
  keep = [t for n, t in docs if prepare.is_validation(n, val_fraction) == (split == "val")]
  ids = [list(t.encode()) + [256] for t in keep]
  starts = np.cumsum([0] + [len(x) for x in ids])[:-1]
  return np.array([i for x in ids for i in x]), starts


def _digests(out):
  return {f: hashlib.sha256((out / f).read_bytes()).hexdigest()
          for f in sorted(os.listdir(out)) if f.endswith((".bin", ".idx", "manifest.json"))}


def test_prepare_bytes_matches_a_hand_built_stream_and_workers_do_not_change_it(tmp_path):
  root, docs = _corpus(tmp_path)
  one = prepare.prepare(str(root / "*"), "bytes", str(tmp_path / "w1"), val_fraction=0.2,
                        docs_per_shard=2)
  two = prepare.prepare(str(root / "*"), "bytes", str(tmp_path / "w2"), val_fraction=0.2,
                        docs_per_shard=2, workers=2)
  assert _digests(tmp_path / "w1") == _digests(tmp_path / "w2")
  assert len(one["shards"]) == 2 + 3       # a shard per jsonl, 5 text files by 2
  assert one["empty_documents"] == 2 and one["malformed_records"] == 2
  assert one["shards"][1]["malformed_at"] == [f"{root}/a1.jsonl:31", f"{root}/a1.jsonl:33"]
  assert one["tokenizer"] == {"kind": "bytes", "vocab_size": 257, "eos_id": 256,
                              "bos_id": None, "sha256": "bytes"}
  for split in ("train", "val"):
    tokens, starts = _bytes_stream(docs, 0.2, split)
    assert len(starts) > 0
    stream = shards.TokenStream(str(tmp_path / "w1"), shards.read_manifest(str(tmp_path / "w1")), split)
    np.testing.assert_array_equal(stream.read(0, len(stream)), tokens)
    np.testing.assert_array_equal(stream[5:len(stream) - 3], tokens[5:-3])
    # Rows across shard boundaries: segments and positions as a per-token loop says.
    rows = batches_lib.PackedRows(stream, seq_len=15)
    got = rows.rows(np.arange(rows.n_rows)[::-1])
    for k, r in enumerate(range(rows.n_rows)[::-1]):
      seg, pos, prev = [], [], None
      for t in range(16):
        doc = bisect.bisect_right(list(starts), r * 16 + t) - 1
        seg.append((seg[-1] if seg else 0) + (doc != prev))
        pos.append(0 if doc != prev else pos[-1] + 1)
        prev = doc
      np.testing.assert_array_equal(got["tokens"][k], tokens[r * 16:(r + 1) * 16])
      np.testing.assert_array_equal(got["segments"][k], seg)
      np.testing.assert_array_equal(got["positions"][k], pos)


def test_a_killed_preparation_keeps_its_finished_shards(tmp_path):
  root, _ = _corpus(tmp_path)
  out = tmp_path / "out"
  prepare.prepare(str(root / "*"), "bpe:300", str(out), docs_per_shard=2)
  want = _digests(out)
  # As if killed after shards 0 and 1: later shards' entries gone, a stray temporary file.
  kept = os.path.getmtime(out / "train-00001.bin")
  for i in (2, 3, 4):
    os.remove(out / f"shard-{i:05d}.json")
  os.remove(out / "manifest.json")
  (out / "train-00003.bin.tmp999").write_bytes(b"partial")
  with pytest.raises(ValueError, match="did not finish"):
    corpus_lib.open_prepared(str(out), 512)
  prepare.prepare(str(root / "*"), "bpe:300", str(out), docs_per_shard=2)
  assert _digests(out) == want
  assert os.path.getmtime(out / "train-00001.bin") == kept
  with pytest.raises(inputs.InputError, match="differs in: tokenizer"):
    prepare.prepare(str(root / "*"), "bytes", str(out), docs_per_shard=2)


def test_a_hugging_face_tokenizer_frames_documents_its_way(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  hf = tmp_path / "hf"
  hf.mkdir()
  tok.save(str(hf / "tokenizer.json"))
  (hf / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True}))
  src = tmp_path / "d.jsonl"
  src.write_text('{"text": "hello world"}\n{"text": "world zzz"}\n')
  m = prepare.prepare(str(src), str(hf), str(tmp_path / "out"), val_fraction=0.0)
  assert m["framing"] == "[bos] tokens eos" and m["tokenizer"]["bos_id"] == 0
  stream = shards.TokenStream(str(tmp_path / "out"), m, "train")
  np.testing.assert_array_equal(stream.read(0, len(stream)), [0, 3, 4, 1, 0, 4, 2, 1])
  # Without add_bos_token: no bos; an eos that is not in the vocabulary is named.
  m = prepare.prepare(str(src), str(hf / "tokenizer.json"), str(tmp_path / "o2"),
                      bos_token=None, eos_token="</s>")
  assert m["framing"] == "[bos] tokens eos"     # the folder's config still says add_bos
  with pytest.raises(inputs.InputError, match="'<eos>' is not in"):
    prepare.prepare(str(src), str(hf), str(tmp_path / "o3"), eos_token="<eos>")
  tok.save(str(tmp_path / "bare.json"))
  with pytest.raises(inputs.InputError, match="no eos token"):
    prepare.prepare(str(src), str(tmp_path / "bare.json"), str(tmp_path / "o4"))


def test_bad_inputs_are_named(tmp_path):
  root, _ = _corpus(tmp_path)
  with pytest.raises(inputs.InputError, match="'nothing/\\*.jsonl' matches no file"):
    prepare.prepare("nothing/*.jsonl", "bytes", str(tmp_path / "o"))
  with pytest.raises(inputs.InputError, match=r"a1.jsonl:31: JSONDecodeError"):
    prepare.prepare(str(root / "a1.jsonl"), "bytes", str(tmp_path / "o1"),
                    on_malformed="error")
  (tmp_path / "blob.txt").write_bytes(b"\x00\x01binary")
  with pytest.raises(inputs.InputError, match="blob.txt: not a text file"):
    prepare.prepare(str(tmp_path / "blob.txt"), "bytes", str(tmp_path / "o2"))
  (tmp_path / "empty.jsonl").write_text('{"text": " "}\n')
  with pytest.raises(inputs.InputError, match="no non-empty training document"):
    prepare.prepare(str(tmp_path / "empty.jsonl"), "bytes", str(tmp_path / "o3"))


def _cfg(tmp_path, paths, vocab=512):
  from configs import smoke
  c = smoke.get_config()
  c.data.source, c.data.paths, c.data.cache_dir = "prepared", paths, str(tmp_path / "c")
  c.model.vocab_size = vocab
  return c


def test_training_refuses_a_bad_prepared_dataset_by_name(tmp_path):
  root, _ = _corpus(tmp_path)
  out = tmp_path / "out"
  prepare.prepare(str(root / "*"), "bpe:400", str(out), docs_per_shard=2)
  corpus = corpus_lib.load_corpus(_cfg(tmp_path, str(out)).data, 512)
  assert corpus.train[0].n_docs + corpus.val[0].n_docs == 64    # 60 records, 4 text files
  with pytest.raises(ValueError, match=r"has 3\d\d tokens but model.vocab_size=300"):
    corpus_lib.load_corpus(_cfg(tmp_path, str(out)).data, 300)
  with pytest.raises(ValueError, match="not a prepared dataset"):
    corpus_lib.load_corpus(_cfg(tmp_path, str(tmp_path)).data, 512)
  good = (out / "train-00002.bin").read_bytes()
  (out / "train-00002.bin").write_bytes(good[::-1])
  with pytest.raises(ValueError, match="train-00002.bin is corrupt \\(checksum"):
    corpus_lib.load_corpus(_cfg(tmp_path, str(out)).data, 512)
  (out / "train-00002.bin").write_bytes(good)
  os.remove(out / "val-00004.idx")
  with pytest.raises(ValueError, match="val-00004.idx is missing"):
    corpus_lib.load_corpus(_cfg(tmp_path, str(out)).data, 512)


def test_prepare_data_entry_point(tmp_path):
  root, _ = _corpus(tmp_path, n_json=5, n_txt=3)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  base = [sys.executable, "-m", "experiments.prepare_data", f"--inputs={root}/*",
          "--tokenizer=bytes"]
  r = subprocess.run(base + [f"--out={tmp_path / 'out'}", "--val_fraction=0.3"], cwd=repo,
                     env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "skipped 2 empty and 2 malformed" in r.stderr
  r = subprocess.run(base + [f"--out={tmp_path / 'o2'}", "--on_malformed=error"], cwd=repo,
                     env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "a1.jsonl:6: JSONDecodeError" in r.stderr and "--on_malformed=skip" in r.stderr


def test_a_mixture_keeps_its_weights_and_is_a_pure_function_of_the_step(tmp_path):
  """Source a's rows hold only 'a' bytes, b's only 'b': a row's source is visible."""
  dirs = []
  for name, n_docs in (("a", 40), ("b", 9)):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": name * (50 + i)}) + "\n"
                           for i in range(n_docs)))
    prepare.prepare(str(src), "bytes", str(tmp_path / name))
    dirs.append(str(tmp_path / name))
  cfg = _cfg(tmp_path, f"{dirs[0]}:0.7,{dirs[1]}:0.3").data
  corpus = corpus_lib.load_corpus(cfg, 512)
  assert corpus.weights == [0.7, 0.3]
  mix = batches_lib.packed_rows(corpus.train, corpus.weights, 15, seed=3)
  assert isinstance(mix, batches_lib.Mixture) and mix.counts.tolist() == [717, 307]
  schedule = batches_lib.BatchSchedule(mix, 32, 3)
  batches = [schedule.batch(s)["tokens"] for s in range(64)]     # two blocks of 1024
  is_a = np.concatenate([np.isin(b, [97, 256]).all(1) for b in batches])
  is_b = np.concatenate([np.isin(b, [98, 256]).all(1) for b in batches])
  assert (is_a ^ is_b).all()
  assert is_a[:1024].sum() == 717 and is_a[1024:].sum() == 717   # exact per block
  assert abs(is_a[:96].mean() - 0.7) < 3 * np.sqrt(0.21 / 96)     # and close in a batch
  # Pure in (seed, step): any process split, a fresh schedule, the same rows.
  again = batches_lib.BatchSchedule(
      batches_lib.packed_rows(corpus.train, corpus.weights, 15, seed=3), 32, 3)
  for step in (0, 5, 63):
    parts = [again.batch(step, i, 4)["tokens"] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), batches[step])
  # Each source's position in the mixture counts up through its own rows: b (the small
  # source, 24 rows) has started its second epoch by the second block, a has not.
  src, pos = mix.locate(np.arange(2048))
  for k in (0, 1):
    np.testing.assert_array_equal(np.sort(pos[src == k]), np.arange((src == k).sum()))
  b_rows = mix.sources[1].n_rows
  first_epoch = [mix._permutation(1, 0)[q] for q in range(b_rows)]
  assert sorted(first_epoch) == list(range(b_rows))
  # Validation: in order, no shuffle, sized so no source repeats.
  val = batches_lib.packed_rows(corpus.train, corpus.weights, 15, seed=0, shuffle=False)
  assert mix.n_rows == mix.sources[0].n_rows + b_rows
  assert val.n_rows == 0        # b's 24 rows cannot fill its 307 slots of one block
  with pytest.raises(ValueError, match="another tokenizer"):
    prepare.prepare(str(tmp_path / "b.jsonl"), "bpe:300", str(tmp_path / "c"))
    corpus_lib.load_corpus(_cfg(tmp_path, f"{dirs[0]}:1,{tmp_path / 'c'}:1").data, 512)


def test_parquet_and_a_saved_dataset_are_read_row_by_row(tmp_path):
  """A .parquet file and a `save_to_disk` folder (Arrow stream files beside
  dataset_info.json): every row's text becomes one document, in row order (a row
  without text is counted as malformed), each file its own shard."""
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  root = tmp_path / "in"
  (root / "ds").mkdir(parents=True)
  par = [f"parquet row {i}: " + "ü" * i for i in range(7)]
  pq.write_table(pa.table({"text": par + [None], "n": list(range(8))}), root / "p.parquet",
                 row_group_size=3)
  saved = [f"saved row {i}" for i in range(5)]
  (root / "ds" / "dataset_info.json").write_text("{}")
  for k, part in enumerate((saved[:2], saved[2:])):
    table = pa.table({"text": part})
    with pa.ipc.new_stream(str(root / "ds" / f"data-{k:05d}-of-00002.arrow"),
                           table.schema) as w:
      w.write_table(table)
  out = tmp_path / "out"
  m = prepare.prepare(f"{root}/p.parquet,{root}/ds", "bytes", str(out), val_fraction=0.0)
  assert len(m["shards"]) == 2 and m["malformed_records"] == 1
  stream = shards.TokenStream(str(out), shards.read_manifest(str(out)), "train")
  want = [t for text in saved + par for t in list(text.encode()) + [256]]   # ds sorts first
  np.testing.assert_array_equal(stream.read(0, len(stream)), want)


def test_prefetched_batches_equal_the_schedule_in_any_order_and_thread_count(tmp_path):
  """The loader builds batches ahead in Grain's threads; whatever the depth and thread count,
  get(s) is exactly BatchSchedule.batch(s), for steps in order, after a jump (a resume)
  and across batch-size stages, over a mixture (whose memo the threads share); with
  depth 0 nothing is built in the background."""
  import threading
  root, _ = _corpus(tmp_path)
  a = prepare.prepare(str(root / "a*.jsonl"), "bytes", str(tmp_path / "a"))
  b = prepare.prepare(str(root / "t*.txt"), "bytes", str(tmp_path / "b"))
  del a, b
  streams = [shards.TokenStream(str(tmp_path / d), shards.read_manifest(str(tmp_path / d)),
                                "train") for d in ("a", "b")]
  rows = batches_lib.packed_rows(streams, [0.7, 0.3], 15, seed=3)
  schedule = batches_lib.BatchSchedule(rows, 4, seed=3, stages=[(0, 4), (5, 8)])
  steps = list(range(0, 9)) + [3, 4] + list(range(12, 20))
  want = [schedule.batch(s, 1, 2) for s in steps]
  for depth, threads in ((0, 1), (1, 1), (3, 4)):
    built_on = []

    def make(s):
      built_on.append(threading.current_thread().name)
      return batches_lib.BatchSchedule(rows, 4, seed=3, stages=[(0, 4), (5, 8)]).batch(s, 1, 2) \
          if s % 5 == 0 else schedule.batch(s, 1, 2)
    loader = batches_lib.Prefetcher(make, depth, threads)
    got = [loader.get(s) for s in steps]
    loader.close()
    for g, w in zip(got, want):
      for k in w:
        np.testing.assert_array_equal(g[k], w[k], err_msg=f"depth {depth} {k}")
    background = [n for n in built_on if n.startswith("grain-prefetch")]
    assert (len(background) == len(built_on)) if depth else not background
  # Nothing past the run's last step is built (stop = total steps).
  built = []
  loader = batches_lib.Prefetcher(lambda s: built.append(s) or s, 3, 2, stop=6)
  assert [loader.get(s) for s in range(6)] == list(range(6))
  loader.close()
  assert sorted(built) == list(range(6))
  with pytest.raises(ValueError, match="threads >= 1"):
    batches_lib.Prefetcher(lambda s: s, 2, 0)


def _two_documents_the_hash_keeps(root):
  """Two text files whose names the 1% hash split both puts in training."""
  names = [n for n in (f"doc{i}.txt" for i in range(100))
           if not prepare.is_validation(n, prepare.DEFAULT_VAL_FRACTION)][:2]
  for i, n in enumerate(names):
    (root / n).write_text(f"document {i}\n" * 50)
  return sorted(names)


def test_the_default_split_holds_out_a_document_of_any_two(tmp_path):
  """prepare's default (1%, by hash) held out nothing of a small corpus, and training on
  it could not start: the first document of the first shard is now held out, the
  manifest says how, and the same inputs give the same files."""
  root = tmp_path / "in"
  root.mkdir()
  names = _two_documents_the_hash_keeps(root)
  m = prepare.prepare(str(root / "*"), "bytes", str(tmp_path / "a"))
  assert m["totals"]["val"]["docs"] == 1 and m["totals"]["train"]["docs"] == 1
  assert m["split"] == {"method": prepare.SPLIT_METHOD, "val_fraction": 0.01,
                        "fallback": prepare.FALLBACK_METHOD.format(index=0)}
  val = shards.TokenStream(str(tmp_path / "a"), shards.read_manifest(str(tmp_path / "a")),
                           "val")
  assert bytes(val.read(0, len(val) - 1).astype(np.uint8)).decode() == (root / names[0]).read_text()
  prepare.prepare(str(root / "*"), "bytes", str(tmp_path / "b"))
  assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
  # One document: nothing to hold out; val_fraction 0: none asked for.
  assert prepare.prepare(str(root / names[0]), "bytes", str(tmp_path / "c"))["split"][
      "fallback"] is None
  none = prepare.prepare(str(root / "*"), "bytes", str(tmp_path / "d"), val_fraction=0.0)
  assert none["totals"]["val"]["docs"] == 0 and none["split"]["fallback"] is None


def test_the_readmes_prepare_then_train_path_starts_with_the_defaults(tmp_path):
  """`prepare_data` with its defaults, then training on the result: it refused to start
  ("the validation split: the stream has 0 tokens")."""
  import sysconfig
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  stdlib = sysconfig.get_paths()["stdlib"]
  r = subprocess.run([sys.executable, "-m", "experiments.prepare_data",
                      f"--inputs={stdlib}/json/*.py", "--tokenizer=bytes",
                      f"--out={tmp_path / 'data'}"], cwd=repo, env=subprocess_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "validation 1 documents" in r.stdout and "the first document of shard 0" in r.stdout
  r = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/smoke.py",
                      f"--workdir={tmp_path / 'run'}", "--config.data.source=prepared",
                      f"--config.data.paths={tmp_path / 'data'}", "--config.total_steps=2",
                      "--config.final_eval_batches=2", "--peak_flops=1e11"], cwd=repo,
                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "eval at step 2" in r.stdout
