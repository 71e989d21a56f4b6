"""Compile a config's train step, or its serving decode step or prefill, for a TPU topology
on this host, and say whether it fits.

  pip install -e ".[tpu]"
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x16x16
  python -m experiments.compile --config=configs/deepseek_v2_lite.py --topology=v5p:2x2x4 \
      --config.model.n_layers=4 --out=report.json
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8 \
      --stage=1          # the batch ramp's first stage (default: the largest)
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8 \
      --stage=128k       # a context-extension stage (config.extension)
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:4x4x8 \
      --mode=decode --batch=128 --context=32768   # serving: one cached decode step
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:4x4x8 \
      --mode=decode --batch=4096 --context=32768 --mha   # and the MHA counterfactual
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:4x4x8 \
      --mode=decode --batch=4096 --context=32768 --find_max_batch --weights=int8
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:4x4x8 \
      --mode=prefill --batch=128 --context=32768  # one prefill of 128 prompts

Prints the per-chip memory, the executed work against the useful work by class, HBM and
collective bytes and a roofline step (deepseek_jax/train/aot.py, aot_work.py), writes
them as JSON with --out (--dump_hlo=FILE: the optimised HLO text too), and exits with
status 1 when the program does not fit the chips' HBM. No TPU is needed: libtpu
compiles for the topology's abstract devices.
"""

import json
import os
import sys

# A TPU program is compiled here, never run: keep jax on the CPU backend (with libtpu
# installed a plain import would try to open a TPU first).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:8x16x16, v5p:2x2x1, "
                                "v6e:16x16, v5e:16x16, v4:8x8x8.")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON to this file.")
_STAGE = flags.DEFINE_string("stage", "largest", "With a batch-size ramp (schedule."
                             "batch_size): the stage to compile, by number (1 = first), "
                             "by a token count it covers (200B), or 'largest'; or a "
                             "context-extension stage by name (config.extension: 32k).")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "Write the compiled (optimised) HLO text "
                                "of the train step to this file.")
_ROUTING = flags.DEFINE_string("routing_counts", None, "Count the routed experts' work "
                               "and rounds at these per-layer expert loads: a run's "
                               "metrics.jsonl (its last evaluation's val_load) or JSON "
                               "[[count per expert] per layer]. Default: balanced.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "decode", "prefill"],
                          "train: the train step; decode: one cached decode step of "
                          "--batch requests at --context positions; prefill: --batch "
                          "prompts of --context tokens into an empty cache (serving: "
                          "weights bf16 or int8, experts over an expert axis).")
_BATCH = flags.DEFINE_integer("batch", 128, "--mode=decode/prefill: requests together "
                              "(with --find_max_batch: the first guess).")
_CONTEXT = flags.DEFINE_integer("context", 32768, "--mode=decode: cached positions a "
                                "request; --mode=prefill: prompt tokens a request.")
_WEIGHTS = flags.DEFINE_enum("weights", "bf16", ["bf16", "int8"], "--mode=decode/prefill: "
                             "matmul weights in bf16, or int8 with per-output-channel "
                             "scales dequantised inside the step.")
_MHA = flags.DEFINE_bool("mha", False, "--mode=decode: also compile the MHA counterfactual "
                         "(per-head K and V cached instead of the latent).")
_FIND_MAX = flags.DEFINE_bool("find_max_batch", False, "--mode=decode: find the largest "
                              "batch that fits at --context by compiling (--batch is the "
                              "first guess); report at that batch.")
flags.mark_flags_as_required(["config", "topology"])


def serve(cfg):
  """--mode=decode/prefill: the report of inference/compile_decode.py or compile_prefill."""
  from deepseek_jax.inference import compile_decode, compile_prefill
  from deepseek_jax.model.config import model_config_from
  mode = _MODE.value
  if _BATCH.value < 1 or _CONTEXT.value < 1:
    raise app.UsageError(f"--batch and --context must be >= 1; got {_BATCH.value}, "
                         f"{_CONTEXT.value}")
  if mode == "prefill" and (_MHA.value or _FIND_MAX.value):
    raise app.UsageError("--mha and --find_max_batch go with --mode=decode only")
  model = model_config_from(cfg.model).replace(dtype="bfloat16", param_dtype="bfloat16")
  mesh = {"data": 1, "fsdp": 1, "expert": -1, "context": 1,
          "tensor": cfg.mesh.get("tensor", 1)}
  if mode == "prefill":
    r = compile_prefill.prefill_report(model, _TOPOLOGY.value, _BATCH.value,
                                       _CONTEXT.value, mesh, _WEIGHTS.value)
    return r, compile_prefill.format_prefill_report(r), r["fits_hbm"]
  r = compile_decode.decode_report(model, _TOPOLOGY.value, _BATCH.value, _CONTEXT.value,
                                   mesh, _WEIGHTS.value, mha=_MHA.value,
                                   find_max_batch=_FIND_MAX.value)
  ok = r["max_batch"][str(_CONTEXT.value)] > 0 if _FIND_MAX.value else r["fits_hbm"]
  return r, compile_decode.format_decode_report(r), ok


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.train import aot, aot_routing, aot_text, tpu
  from deepseek_jax.train.recipe import Recipe
  from configs import common
  cfg = _CONFIG.value
  if _MODE.value != "train":
    try:
      r, text, ok = serve(cfg)
    except (tpu.TopologyError, ValueError) as e:
      sys.exit(f"experiments.compile: {e}")
    print(text)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(r, f, indent=1)
    sys.exit(0 if ok else 1)
  if _MHA.value or _FIND_MAX.value or _WEIGHTS.value != "bf16":
    raise app.UsageError("--mha, --find_max_batch and --weights go with --mode=decode "
                         "or --mode=prefill")
  try:
    spec = _STAGE.value
    if spec in (cfg.get("extension") or {}):
      cfg, spec = common.extension_stage(cfg, spec), "largest"
    stage = Recipe(cfg).stage(spec)
    if stage.batch != cfg.batch_size:
      cfg = cfg.copy_and_resolve_references()
      cfg.batch_size = stage.batch
    counts = aot_routing.read_routing_counts(_ROUTING.value) if _ROUTING.value else None
    r = aot.report(cfg, _TOPOLOGY.value, routing_counts=counts, dump_hlo=_DUMP_HLO.value)
    r["stage"] = {"batch": stage.batch, "start_step": stage.start_step,
                  "start_tokens": stage.start_tokens}
  except (tpu.TopologyError, ValueError) as e:
    sys.exit(f"experiments.compile: {e}")
  except OSError as e:
    sys.exit(f"experiments.compile: cannot read {e.filename}: {e.strerror}")
  print(aot_text.format_report(r))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(r, f, indent=1)
  if not r["fits_hbm"]:
    sys.exit(1)


if __name__ == "__main__":
  launch.run(main)
