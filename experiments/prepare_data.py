"""Tokenize local text into a prepared dataset that training reads from disk.

  python -m experiments.prepare_data --inputs='corpus/*.jsonl' --tokenizer=bpe:8192 \
      --out=data/mine --workers=2
  python -m experiments.train --config=configs/small.py --workdir=runs/mine \
      --config.data.source=prepared --config.data.paths=data/mine

--inputs: comma-separated globs of .jsonl/.json (one record per line, its text in
--text_field), .parquet or `datasets` save_to_disk folders (both need pyarrow), or plain
text files (one document per file). --tokenizer: bytes, bpe:VOCAB (trained on the
inputs), or a Hugging Face tokenizer.json / a folder holding one. Rerun the same command
after an interruption: finished shards are kept. deepseek_jax/data/prepare.py has the
details.
"""

from absl import app, flags, logging

from deepseek_jax.data import inputs, prepare

_INPUTS = flags.DEFINE_string("inputs", None, "Comma-separated globs of input files.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "bytes | bpe:VOCAB | a tokenizer.json "
                                 "(or a folder holding one).")
_OUT = flags.DEFINE_string("out", None, "Output folder (the prepared dataset).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Tokenizing processes.")
_VAL = flags.DEFINE_float("val_fraction", prepare.DEFAULT_VAL_FRACTION,
                          "Fraction of documents held out for validation (by a hash of "
                          "each document's name; at least one of two or more); 0: none.")
_FIELD = flags.DEFINE_string("text_field", "text", "The text field of json/parquet records.")
_MALFORMED = flags.DEFINE_enum("on_malformed", "skip", ["skip", "error"],
                               "A malformed record: skip and count it, or stop naming its "
                               "file and line.")
_DOCS = flags.DEFINE_integer("docs_per_shard", 1024, "Whole-file documents per shard.")
_BOS = flags.DEFINE_string("bos_token", None, "Begin-of-document token (overrides the "
                           "tokenizer's own convention).")
_EOS = flags.DEFINE_string("eos_token", None, "End-of-document token (overrides "
                           "tokenizer_config.json).")
flags.mark_flags_as_required(["inputs", "tokenizer", "out"])


def main(argv):
  del argv
  if _WORKERS.value < 1 or _DOCS.value < 1:
    raise app.UsageError("--workers and --docs_per_shard must be >= 1")
  try:
    m = prepare.prepare(_INPUTS.value, _TOKENIZER.value, _OUT.value, workers=_WORKERS.value,
                        val_fraction=_VAL.value, text_field=_FIELD.value,
                        on_malformed=_MALFORMED.value, docs_per_shard=_DOCS.value,
                        bos_token=_BOS.value, eos_token=_EOS.value)
  except inputs.InputError as e:
    raise app.UsageError(str(e)) from None
  t, v = m["totals"]["train"], m["totals"]["val"]
  mb = m["text_bytes"] / 1e6
  logging.info("prepared %s: %d shards; train %d documents, %d tokens; validation %d "
               "documents, %d tokens; %.1f MB of text (%.2f MB/s this run); skipped %d "
               "empty and %d malformed; tokenizer %s (vocab %d, framing: %s)", _OUT.value,
               len(m["shards"]), t["docs"], t["tokens"], v["docs"], v["tokens"], mb,
               mb / max(m["seconds"], 1e-9), m["empty_documents"], m["malformed_records"],
               m["tokenizer"]["kind"], m["tokenizer"]["vocab_size"], m["framing"])
  print(f"{_OUT.value}: {t['tokens'] + v['tokens']:,} tokens in {len(m['shards'])} shards; "
        f"validation {v['docs']:,} documents, {v['tokens']:,} tokens "
        f"({m['split']['fallback'] or f'a hash of each name, fraction {_VAL.value}'})")


if __name__ == "__main__":
  app.run(main)
