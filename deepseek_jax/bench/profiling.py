"""Where a compiled step's time goes: a jax.profiler trace of a few calls, with every
device op's time attributed to the part of the model that emitted it.

The trace (DIR/plugins/profile/*/*.trace.json.gz, viewable in Perfetto or TensorBoard's
profile plugin) names each op by its HLO instruction; the compiled module's text maps an
instruction to its op_name metadata (".../layer_2/attn/..." or "transpose(jvp(...))" for
the backward), which is what the summary groups by.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

import jax

# (part, pattern on op_name), first match wins. Parameter updates come first: their
# op_names mention the parameter path (e.g. "params['layer_1']['attn']...").
PARTS = (
    ("optimizer", r"adam|optax|clip_by_global_norm|global_norm|apply_updates|params\["),
    ("moe_routing", r"moe/.*(top_k|sigmoid|argsort|sort|cumsum|searchsorted|one_hot)"),
    ("moe_shared", r"moe/shared"),
    ("moe_routed", r"moe"),
    ("attention", r"/attn"),
    ("dense_ffn", r"/ffn"),
    ("mtp", r"/mtp_"),
    ("head_loss", r"logits|lm_losses|embed|log_softmax"),
)


def _op_names(hlo_text: str) -> dict[str, str]:
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
    if m and m.group(1) not in names:
      names[m.group(1)] = m.group(2)
  return names


def part_of(op_name: str) -> str:
  direction = "bwd" if "transpose(" in op_name else "fwd"
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return f"{part}/{direction}"
  return f"other/{direction}"


def profile(run, hlo_text: str, trace_dir: str, calls: int = 3) -> dict:
  """Calls run() (which blocks until its work is done) `calls` times under the profiler;
  hlo_text: the compiled module's text (`compiled.as_text()`) that run() executes.

  Returns {"op_ms_per_call": {part/direction: ms}, "total_op_ms_per_call": ms,
  "trace_dir": ...}. Op times add up over concurrent ops, so the total can exceed the
  wall time of a call.
  """
  run()
  jax.profiler.start_trace(trace_dir)
  try:
    for _ in range(calls):
      run()
  finally:
    jax.profiler.stop_trace()
  traces = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                         "*.trace.json.gz")), key=os.path.getmtime)
  if not traces:
    raise FileNotFoundError(f"the profiler wrote no trace.json.gz under {trace_dir}")
  with gzip.open(traces[-1]) as fh:
    events = json.load(fh)["traceEvents"]
  # The module beside its trace: the trace names ops by HLO instruction, this text says
  # what each one is (read offline, e.g. when the trace comes back from another machine).
  with gzip.open(os.path.join(trace_dir, "module.hlo.txt.gz"), "wt") as fh:
    fh.write(hlo_text)
  by_part = op_ms_by_part(events, hlo_text, calls)
  return {"op_ms_per_call": {k: round(v, 2) for k, v in by_part.most_common()},
          "total_op_ms_per_call": round(sum(by_part.values()), 2), "trace_dir": trace_dir}


def _kernel_key(name: str) -> str:
  return re.sub(r"[.\-]", "_", name)


def op_ms_by_part(events, hlo_text: str, calls: int) -> collections.Counter:
  """{part/direction: ms per call} of a trace's device ops. An op is found by its
  `hlo_op` argument (XLA:CPU, TPU) or, where that names a CUDA-graph command buffer
  (XLA:GPU wraps fusions in them), by the kernel's own name: the fusion's HLO name with
  '.' and '-' written '_'. Kernels of libraries (cuDNN, cuBLAS) match no instruction
  and count as other."""
  names = _op_names(hlo_text)
  by_key = {_kernel_key(k): v for k, v in names.items()}
  by_part = collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
    if op is not None:
      op_name = names.get(op) or by_key.get(_kernel_key(e.get("name", "")), "")
      by_part[part_of(op_name)] += e["dur"] / 1e3 / calls
  return by_part
