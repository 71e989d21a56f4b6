"""Run under MaxText's own environment (scripts/maxtext_anchor.sh): MaxText's
train_compile for a TPU topology, keeping the compiled step's optimised HLO text and its
memory analysis (train_compile prints them but returns nothing, so its jit_and_compile
is wrapped to keep the compiled object).

  python scripts/maxtext_anchor.py OUT_DIR MAXTEXT_ARGS...   (MaxText's key=value args)
"""

import json
import os
import sys
import time


def main():
  out_dir, args = sys.argv[1], sys.argv[2:]
  os.makedirs(out_dir, exist_ok=True)
  from maxtext.trainers.pre_train import train_compile
  kept = {}
  compile_fn = train_compile.jit_and_compile

  def keep(*a, **k):
    t = time.perf_counter()
    kept["compiled"] = compile_fn(*a, **k)
    kept["compile_s"] = time.perf_counter() - t
    return kept["compiled"]

  train_compile.jit_and_compile = keep
  config = os.path.join(os.path.dirname(train_compile.__file__), "..", "..", "configs",
                        "base.yml")
  try:
    train_compile.main(["train_compile", os.path.normpath(config), *args])
  except Exception as e:  # the TPU compiler's out-of-memory: recorded, not a crash
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    line = next(l for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l)
    with open(os.path.join(out_dir, "memory.json"), "w") as fh:
      json.dump({"fits": False, "error": line, "args": args}, fh, indent=1)
    print(f"MaxText does not fit: {line}")
    sys.exit(1)
  compiled = kept["compiled"]
  with open(os.path.join(out_dir, "step.hlo"), "w") as fh:
    fh.write(compiled.as_text())
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes)
  with open(os.path.join(out_dir, "memory.json"), "w") as fh:
    json.dump({"fits": True, "arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
               "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
               "host_temporaries": getattr(m, "host_temp_size_in_bytes", 0),
               "total": total, "compile_s": kept["compile_s"], "args": args}, fh, indent=1)


if __name__ == "__main__":
  main()
