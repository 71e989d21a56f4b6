"""Benchmarks: where the time goes, against the Hugging Face reference and the machine.

Each part returns a flat dict of numbers; experiments/bench.py selects parts and writes
JSON. Timings are medians after warm-up; our step and the reference's alternate, so both
see the same machine state (speed on a shared 2-core box drifts by tens of percent).
"""

from __future__ import annotations

import math
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax.model import dispatch
from deepseek_jax.train import program as program_lib, sharding, step as ts
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train.metrics import measure_matmul_peak, train_flops_per_token


def bench_model_config(**overrides) -> ModelConfig:
  """The issue's bench config: d 256, 4 layers (first dense, width 1024), 8 heads,
  q-LoRA 128, kv-LoRA 64, head dims 32, 16 routed top-2 + 1 shared, expert width 256,
  4 groups keep 2, vocab 256, float32. No MTP (HF's model has none)."""
  base = dict(vocab_size=256, d_model=256, n_layers=4, n_heads=8, q_lora_rank=128,
              kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
              ffn_dim=1024, moe_ffn_dim=256, first_k_dense=1, n_shared_experts=1,
              n_routed_experts=16, top_k=2, n_group=4, topk_group=2,
              routed_scaling_factor=1.0, mtp_depth=0, init_std=0.02)
  base.update(overrides)
  return ModelConfig(**base)


def _run_config():
  from configs import common
  return common.base_config(bench_model_config())


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _batch(cfg: ModelConfig, batch, seq, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
  return {"tokens": jnp.asarray(tokens, jnp.int32),
          "segments": jnp.ones((batch, seq + 1), jnp.int32),
          "positions": jnp.asarray(np.broadcast_to(np.arange(seq + 1), (batch, seq + 1)),
                                   jnp.int32)}


class OurTrainer:
  """Our jitted train step on one device, on a fixed synthetic batch."""

  def __init__(self, mcfg: ModelConfig, batch: int, seq: int,
               run_cfg: ml_collections.ConfigDict | None = None):
    """run_cfg: the run's optimizer, balancing and data settings (default: the bench's
    common.base_config); its model section is replaced by mcfg."""
    run_cfg = _run_config() if run_cfg is None else run_cfg
    run_cfg.model = ml_collections.ConfigDict(mcfg.to_dict())
    self.cfg = run_cfg
    # The program experiments.train builds (train/program.py), on one device.
    mesh = sharding.make_mesh({a: 1 for a in sharding.MESH_AXES}, jax.devices()[:1])
    program = program_lib.build(run_cfg, mcfg, mesh)
    self.batch = _batch(mcfg, batch, seq)
    self.hparams = jax.tree.map(jnp.float32, ts.balance_hparams(run_cfg))
    self.state = program.init_fn(jax.random.PRNGKey(0))
    t = time.perf_counter()
    self.fn = program.compile_train_step(self.state, self.batch, self.hparams)
    self.compile_s = time.perf_counter() - t
    self.metrics = None

  def step(self):
    self.state, self.metrics = self.fn(self.state, self.batch, self.hparams)
    jax.block_until_ready(self.metrics["loss"])


class HFTrainer:
  """transformers' DeepseekV3ForCausalLM (torch CPU, default experts implementation),
  the same architecture and batch, AdamW with V3's betas."""

  def __init__(self, mcfg: ModelConfig, batch: int, seq: int, threads: int):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from deepseek_jax import hf
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = hf.config_to_hf(mcfg)
    hf_cfg.pop("architectures", None)
    hf_cfg.pop("model_type", None)
    hf_cfg.pop("torch_dtype", None)
    self.model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_cfg)).float().train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                 weight_decay=0.1)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(
        0, mcfg.vocab_size, (batch, seq + 1)))
    self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]
    self.torch = torch

  def step(self):
    logits = self.model(input_ids=self.inputs).logits
    loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  self.labels.reshape(-1))
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)


def train_throughput(batch=8, seq=256, repeats=7, with_hf=True, threads=None,
                     tiny=False) -> dict:
  """Tokens/s and MFU of our step, the plain SwiGLU chain's MFU (SwiGLUChain) and the
  HF reference's, all three alternating step by step."""
  mcfg = _bench_or_tiny_config(tiny)
  ours = OurTrainer(mcfg, batch, seq)
  hf_trainer = None
  if with_hf:
    try:
      hf_trainer = HFTrainer(mcfg, batch, seq, threads or 2)
    except ImportError:
      hf_trainer = None
  chain = SwiGLUChain(**(dict(layers=2, tokens=64, d=32, f=64) if tiny else {}))
  for _ in range(2):  # warm-up
    ours.step()
    chain.step()
    if hf_trainer:
      hf_trainer.step()
  t_ours, t_hf, t_chain = [], [], []
  for _ in range(repeats):
    t_ours.append(_median_time(ours.step, 1))
    t_chain.append(_median_time(chain.step, 1))
    if hf_trainer:
      t_hf.append(_median_time(hf_trainer.step, 1))
  peak = measure_matmul_peak()
  tokens = batch * seq
  flops = train_flops_per_token(mcfg, seq) * tokens
  out = {"train_step_s": float(np.median(t_ours)),
         "train_tokens_per_s": tokens / float(np.median(t_ours)),
         "matmul_peak_flops": peak,
         "model_flops_per_step": flops,
         "mfu": flops / float(np.median(t_ours)) / peak,
         "compile_s": ours.compile_s,
         "dropped_frac": float(ours.metrics["dropped_frac"]),
         "loss": float(ours.metrics["loss"]),
         # The plain SwiGLU chain, timed between our steps: what the compiler reaches on
         # this machine without attention, routing or dispatch.
         "xla_ceiling_step_s": float(np.median(t_chain)),
         "xla_ceiling_mfu": chain.flops / float(np.median(t_chain)) / peak,
         "mfu_vs_xla_ceiling": (flops / float(np.median(t_ours)))
                               / (chain.flops / float(np.median(t_chain)))}
  if hf_trainer:
    out["hf_train_step_s"] = float(np.median(t_hf))
    out["hf_train_tokens_per_s"] = tokens / float(np.median(t_hf))
    out["train_speedup_vs_hf"] = out["train_tokens_per_s"] / out["hf_train_tokens_per_s"]
    out["hf_mfu"] = flops / float(np.median(t_hf)) / peak
  return out


class SwiGLUChain:
  """What XLA:CPU reaches without our graph: a plain residual stack of SwiGLU layers on
  [tokens, D] rows (x <- x + down(silu(x gate) * (x up))), forward + backward + an SGD
  update in one jitted, donated step, float32. At the issue's sizes (4 layers, 2048
  tokens, D 256, F 1024) it is the bench model's dense FFN shapes without attention,
  routing or dispatch: the ceiling our step's MFU is compared with."""

  def __init__(self, layers=4, tokens=2048, d=256, f=1024, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3 * layers + 1)
    self.x = jax.random.normal(keys[0], (tokens, d), jnp.float32)
    shapes = ((d, f), (d, f), (f, d))
    self.w = [jax.random.normal(k, shapes[i % 3], jnp.float32) * 0.02
              for i, k in enumerate(keys[1:])]
    # The matmuls it runs: 3 a layer forward, each again for the weight gradient and for
    # the input gradient, except the first layer's gate and up input gradients (x is
    # data, not differentiated): 9 L - 2 products of 2 T D F FLOPs.
    self.flops = (9 * layers - 2) * 2 * tokens * d * f

    def loss(w, x):
      for i in range(0, len(w), 3):
        x = x + (jax.nn.silu(x @ w[i]) * (x @ w[i + 1])) @ w[i + 2]
      return jnp.mean(x * x)

    def step(w, x):
      value, g = jax.value_and_grad(loss)(w, x)
      return [wi - 1e-3 * gi for wi, gi in zip(w, g)], value

    self.fn = jax.jit(step, donate_argnums=0)

  def step(self):
    self.w, value = self.fn(self.w, self.x)
    jax.block_until_ready(value)


def moe_scaling(experts=(8, 32, 128, 256), tokens=2048, top_k=2, d_model=256, width=256,
                paths=("dropless", "capacity", "reference"), repeats=5,
                reference_max_experts=32) -> dict:
  """MoE routed-expert forward+backward time vs expert count at fixed tokens."""
  out = {}
  rng = jax.random.PRNGKey(0)
  for E in experts:
    k = jax.random.split(jax.random.fold_in(rng, E), 5)
    x = jax.random.normal(k[0], (tokens, d_model))
    w = [jax.random.normal(k[i], s) * 0.02 for i, s in
         zip((1, 2, 3), ((E, d_model, width), (E, d_model, width), (E, width, d_model)))]
    logits = jax.random.normal(k[4], (tokens, E))
    idx = jax.lax.top_k(logits, top_k)[1]
    gates = jnp.full((tokens, top_k), 1.0 / top_k)
    for path in paths:
      if path == "reference" and E > reference_max_experts:
        continue

      def loss(x, wg, wu, wd, path=path, E=E):
        if path == "dropless":
          y, _ = dispatch.experts_dropless(x, idx, gates, wg, wu, wd,
                                      dispatch.dropless_block_size(tokens * top_k, E))
        elif path == "capacity":
          c = math.ceil(1.25 * tokens * top_k / E)
          y, _ = dispatch.experts_capacity(x, idx, gates, wg, wu, wd, c)
        else:
          y, _ = dispatch.experts_reference(x, idx, gates, wg, wu, wd)
        return jnp.sum(y * y)

      f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
      jax.block_until_ready(f(x, *w))
      out[f"moe_{path}_E{E}_s"] = _median_time(lambda: jax.block_until_ready(f(x, *w)),
                                               repeats)
  for path in paths:
    if f"moe_{path}_E8_s" in out and f"moe_{path}_E256_s" in out:
      out[f"moe_{path}_ratio_256_vs_8"] = out[f"moe_{path}_E256_s"] / out[f"moe_{path}_E8_s"]
  out["moe_time_ratio_256_vs_8"] = out.get("moe_dropless_ratio_256_vs_8", float("nan"))
  return out


def peak_host_memory_bytes() -> int:
  """The process's peak resident set so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def profile_train_step(trace_dir: str, tiny: bool = False) -> dict:
  """A jax.profiler trace of 3 bench-config train steps and the op time per model part
  (profiling.py): flat keys profile_<part>/<fwd|bwd>_ms."""
  from deepseek_jax.bench import profiling
  batch, seq = (2, 32) if tiny else (8, 256)
  ours = OurTrainer(_bench_or_tiny_config(tiny), batch, seq)
  res = profiling.profile(ours.step, ours.fn.as_text(), trace_dir)
  out = {f"profile_{k}_ms": v for k, v in res["op_ms_per_call"].items()}
  out["profile_total_op_ms"] = res["total_op_ms_per_call"]
  return out


def _bench_or_tiny_config(tiny: bool) -> ModelConfig:
  mcfg = bench_model_config()
  if tiny:
    mcfg = mcfg.replace(d_model=32, n_heads=2, q_lora_rank=16, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, ffn_dim=64,
                        moe_ffn_dim=16, n_layers=2)
  return mcfg


def run_all(parts, hf=True, tiny=False, repeats=7, spec_workdir=None,
            profile_dir=None) -> dict:
  """The parts selected, at the issue's sizes (or tiny ones for a smoke run); with
  profile_dir, also a profiler trace of the train step there and its time per part.
  spec_workdir: a training run with MTP whose module drafts for the speculative
  measurement (default: a small drafter is trained on the embedded corpus first)."""
  results = {}
  if "train" in parts:
    batch, seq = (2, 32) if tiny else (8, 256)
    results.update(train_throughput(batch=batch, seq=seq, repeats=2 if tiny else repeats,
                                    with_hf=hf, tiny=tiny))
  if "moe" in parts:
    if tiny:
      results.update(moe_scaling(experts=(8, 256), tokens=64, d_model=16, width=16,
                                 repeats=2, paths=("dropless", "capacity")))
    else:
      results.update(moe_scaling(repeats=repeats))
  if "decode" in parts:
    from deepseek_jax.bench import decode_speed as benchmark_decode
    results.update(benchmark_decode.run(tiny=tiny, repeats=min(repeats, 5),
                                        spec_workdir=spec_workdir))
  if "data" in parts:
    from deepseek_jax.bench import data_speed
    results.update(data_speed.run(tiny=tiny,
                                  train_tokens_per_s=results.get("train_tokens_per_s")))
  if profile_dir:
    results.update(profile_train_step(profile_dir, tiny=tiny))
  results["peak_host_memory_bytes"] = peak_host_memory_bytes()
  return results


def print_table(results: dict, out):
  width = max(len(k) for k in results)
  for k in sorted(results):
    v = results[k]
    text = f"{v:,.4g}" if isinstance(v, float) else str(v)
    out.write(f"{k:<{width}}  {text}\n")
