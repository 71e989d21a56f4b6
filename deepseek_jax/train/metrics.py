"""Metric plumbing: the analytic FLOP count behind MFU, a measured matmul peak, and the
writers (console line with a progress bar, DIR/metrics.jsonl, TensorBoard events).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.param_count import count_params


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Analytic training FLOPs per token: 3 x forward (backward = 2 x forward), where

    forward = 2 * (activated matmul weights: every weight a token multiplies, i.e. all
               but the embedding lookup and norms, routed experts counted K/E, router
               and output head included; MTP modules included when present)
            + 2 * N * (H + P + O) * T/2 per attention layer (QK^T and PV over on
               average T/2 causal keys).
  """
  c = count_params(cfg)
  matmul = c["activated"] - c["embedding"] - c["norms"]
  attn_layers = cfg.n_layers
  if cfg.mtp_depth:
    # Each module's norms: enorm, hnorm, final, the block's two, and its q/kv latents.
    mtp_norms = 5 * cfg.d_model + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    matmul += (c["mtp_activated"] - cfg.mtp_depth * mtp_norms
               + cfg.mtp_depth * cfg.d_model * cfg.vocab_size)
    attn_layers += cfg.mtp_depth
  attn = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
  return 3.0 * (2.0 * matmul + attn_layers * attn)


def useful_flops_by_class(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """train_flops_per_token split as the compile report classes executed work
  (train/hlo_work.py): routed experts (3 projections of D x F for each of the K chosen
  experts, in every MoE block, main and MTP), attention (MLA's projections and the
  causal QK^T and PV) and other (the rest: dense FFNs, shared experts, routers, MTP
  projections, the head). Per token; they sum to train_flops_per_token."""
  total = train_flops_per_token(cfg, seq_len)
  routed_blocks = cfg.n_moe_layers + (cfg.mtp_depth if cfg.mtp_is_moe else 0)
  routed = 3.0 * 2.0 * 3 * cfg.d_model * cfg.moe_ffn_dim * cfg.top_k * routed_blocks
  attn_layers = cfg.n_layers + cfg.mtp_depth
  attn_params = count_params(cfg)["attention"] / cfg.n_layers * attn_layers
  scores = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
  attention = 3.0 * (2.0 * attn_params + attn_layers * scores)
  return {"routed_experts": routed, "attention": attention,
          "other": total - routed - attention}


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large float32 matmul on the default device, times the local devices
  (the MFU denominator). Simulated CPU devices share the same cores, so on CPU the
  host's peak is the one device's."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  devices = 1 if jax.default_backend() == "cpu" else jax.local_device_count()
  return 2.0 * n ** 3 / float(np.median(times)) * devices


# Console fields and their formats: losses to 4 decimals, balance and MFU to 3, speed
# as a whole number of tokens per second.
CONSOLE_KEYS = ("loss", "ce", "maxvio_mean", "tokens_per_s", "mfu")
EVAL_KEYS = ("val_loss", "val_ppl", "maxvio_global_mean")
_FORMATS = {"loss": "{:.4f}", "ce": "{:.4f}", "val_loss": "{:.4f}", "val_ppl": "{:.2f}",
            "maxvio_mean": "{:.3f}", "maxvio_global_mean": "{:.3f}", "mfu": "{:.3f}",
            "tokens_per_s": "{:,.0f}"}


def _format(key: str, value) -> str:
  return _FORMATS.get(key, "{:.4g}").format(float(value))


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.ndim == 0 else v.tolist()


def read_records(path: str) -> list[dict]:
  """The records of a metrics.jsonl. Its last line may be half-written (a crash or a
  kill mid-write): it is dropped with a warning (a resume rewrites the file without it).
  A bad line anywhere else is an error that names the file and the line."""
  with open(path, encoding="utf-8", errors="replace") as fh:
    lines = fh.readlines()
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e}); a metrics file "
                         "is only ever broken at its last line, so this one was edited "
                         "or damaged") from None
      logging.warning("%s: dropping a half-written last line (%d characters)", path,
                      len(line))
  return records


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX's writer module
  tries `import torch` at import time whenever torch is installed (the parity extra
  installs it), only to widen a type hint: 1.5-2 s per training process for scalars we
  write as floats. Blocking the import for that one statement leaves tensorboardX on
  its numpy path; torch stays importable for everything else afterwards."""
  if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None          # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes on process 0 only: metrics.jsonl (one object per logged step) and TB events."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      try:
        SummaryWriter = _summary_writer_class()
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # TensorBoard files are optional; jsonl always exists
        self.tb = None

  def truncate_after(self, step: int):
    """On resume from a checkpoint after `step` steps: drop the records of the steps it
    does not hold (records are indexed from 0, so step `step` itself is the first to
    rerun) and a half-written last line."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    keep = [r for r in read_records(self.path) if r["step"] < step]
    with open(self.path + ".tmp", "w") as fh:
      fh.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    with open(self.path, "a") as fh:
      fh.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k == "step":
          continue
        if isinstance(v, float) and math.isfinite(v):
          self.tb.add_scalar(k, v, step)
        elif isinstance(v, list) and v and not isinstance(v[0], list):
          for i, x in enumerate(v):
            self.tb.add_scalar(f"{k}/{i}", x, step)
        elif isinstance(v, list) and v and isinstance(v[0], list) and k.endswith("load"):
          for i, row in enumerate(v):  # per-layer expert loads, as histograms over experts
            self.tb.add_histogram(f"{k}/layer{i}", np.asarray(row), step)
      self.tb.flush()

  def console(self, step: int, metrics: dict, eta_s: float | None):
    """One progress line (a line per call, so a log file reads as well as a terminal);
    evaluation results on a line of their own."""
    if not self.enabled:
      return
    frac = step / max(self.total_steps, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    parts = [f"[{bar}] step {step}/{self.total_steps}"]
    parts += [f"{k} {_format(k, metrics[k])}" for k in CONSOLE_KEYS if k in metrics]
    if eta_s is not None:
      parts.append(f"ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s")
    print("  ".join(parts), flush=True, file=sys.stdout)
    evals = [f"{k} {_format(k, metrics[k])}" for k in EVAL_KEYS if k in metrics]
    if evals:
      print(f"  eval at step {step}: " + "  ".join(evals), flush=True, file=sys.stdout)

  def close(self):
    if self.tb is not None:
      self.tb.close()
