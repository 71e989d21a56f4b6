"""The GPU benchmark (issue 22): configs/gpu_1b.py's model on one NVIDIA GPU.

Parts (each a flat dict of numbers; experiments/gpu_bench.py writes them as JSON):
  peak     a bf16 matmul measured here (8192^3), beside the datasheet's dense bf16 peak:
           the two MFU denominators.
  train    our train step (bfloat16 compute, float32 master weights and AdamW) for each
           attention path x expert path, tokens/s and MFU against both peaks; the bias
           and the aux-loss strategies' step times on the default paths.
  hf       the same model in Hugging Face transformers on the same GPU (torch, bf16
           autocast over float32 weights, fused AdamW, SDPA attention), each experts
           implementation transformers offers: the side-by-side reference.
  gemm     the routed experts' grouped matmul alone at 64 experts (forward + backward of
           the three SwiGLU projections): tokamax's kernel against jax.lax.ragged_dot.
  decode   absorbed vs naive cached decoding at a 4K context (decode_speed.py's model).

A part that fails records "<part>/error" and the rest runs: the first run on a new GPU
image should come back with numbers, not with a traceback.
"""

from __future__ import annotations

import gc
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.bench import train_speed
from deepseek_jax.train.metrics import train_flops_per_token

# NVIDIA H200 SXM datasheet: 989.4 TFLOP/s dense bf16 (1,979 is with 2:4 sparsity).
DATASHEET_BF16_FLOPS = {"NVIDIA H200": 989.4e12, "NVIDIA H100 80GB HBM3": 989.4e12}

# (name, attention, experts, strategy): the default paths first, then one change each.
TRAIN_VARIANTS = (
    ("cudnn+tokamax", "cudnn", "tokamax", "bias"),
    ("cudnn+dropless", "cudnn", "dropless", "bias"),
    ("cudnn+dropless/aux", "cudnn", "dropless", "aux"),
    ("tokamax+tokamax", "tokamax", "tokamax", "bias"),
    ("plain+tokamax", "plain", "tokamax", "bias"),
    ("cudnn+xla_ragged", "cudnn", "xla", "bias"),
    ("cudnn+tokamax/aux", "cudnn", "tokamax", "aux"),
)


def _median_s(fn, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  return train_speed._median_time(fn, repeats)


def device_kind() -> str:
  return jax.devices()[0].device_kind


def bf16_matmul_peak(n: int = 8192, repeats: int = 10) -> dict:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  s = _median_s(lambda: f(a, a).block_until_ready(), repeats)
  kind = device_kind()
  return {"device_kind": kind, "matmul_bf16_flops": 2.0 * n ** 3 / s,
          "datasheet_bf16_flops": DATASHEET_BF16_FLOPS.get(kind, float("nan"))}


def shrink(mcfg):
  """A smoke-test size of the same layout (the --tiny run on a CPU: code paths, not
  speed)."""
  return mcfg.replace(vocab_size=256, d_model=64, n_layers=2, n_heads=2, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_dim=128,
                      moe_ffn_dim=32, n_routed_experts=8, top_k=2)


def train_variant(attention: str, experts: str, strategy: str, batch: int, seq: int,
                  repeats: int, peaks: dict, profile_dir: str | None = None,
                  tiny: bool = False) -> dict:
  from configs import gpu_1b
  from deepseek_jax.model.config import model_config_from
  run_cfg = gpu_1b.get_config(f"attention={attention},experts={experts},strategy={strategy}")
  mcfg = model_config_from(run_cfg.model)
  mcfg = shrink(mcfg) if tiny else mcfg
  ours = train_speed.OurTrainer(mcfg, batch, seq, run_cfg=run_cfg)
  step_s = _median_s(ours.step, repeats)
  flops = train_flops_per_token(mcfg, seq) * batch * seq
  out = {"step_s": step_s, "tokens_per_s": batch * seq / step_s, "compile_s": ours.compile_s,
         "loss": float(ours.metrics["loss"]), "model_flops_per_step": flops,
         "mfu_vs_datasheet": flops / step_s / peaks["datasheet_bf16_flops"],
         "mfu_vs_measured_matmul": flops / step_s / peaks["matmul_bf16_flops"]}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_device_bytes"] = stats["peak_bytes_in_use"]
  if profile_dir:
    from deepseek_jax.bench import profiling
    res = profiling.profile(ours.step, ours.fn.as_text(), profile_dir)
    out.update({f"profile/{k}_ms": v for k, v in res["op_ms_per_call"].items()})
    out["profile/total_op_ms"] = res["total_op_ms_per_call"]
  del ours
  gc.collect()
  return out


def hf_reference(batch: int, seq: int, repeats: int, peaks: dict,
                 experts_impls=("grouped_mm", "eager"), tiny: bool = False) -> dict:
  """transformers' DeepseekV3ForCausalLM of configs/gpu_1b.py's model on the GPU (on the
  CPU where torch sees none: the --tiny smoke run)."""
  import torch
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
  from configs import gpu_1b
  from deepseek_jax import hf
  mcfg = gpu_1b.model_config()
  mcfg = shrink(mcfg) if tiny else mcfg
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  hf_cfg = hf.config_to_hf(mcfg)
  for k in ("architectures", "model_type", "torch_dtype"):
    hf_cfg.pop(k, None)
  flops = train_flops_per_token(mcfg, seq) * batch * seq
  out = {}
  for impl in experts_impls:
    try:
      torch.manual_seed(0)
      config = DeepseekV3Config(**hf_cfg, attn_implementation="sdpa",
                                experts_implementation=impl)
      model = DeepseekV3ForCausalLM(config).float().to(device).train()
      opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                              weight_decay=0.1, fused=cuda)
      tokens = torch.from_numpy(np.random.default_rng(0).integers(
          0, mcfg.vocab_size, (batch, seq + 1))).to(device)

      def step():
        with torch.autocast(device, dtype=torch.bfloat16):
          logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
          torch.cuda.synchronize()

      s = _median_s(step, repeats)
      out[f"{impl}/step_s"] = s
      out[f"{impl}/tokens_per_s"] = batch * seq / s
      out[f"{impl}/mfu_vs_measured_matmul"] = flops / s / peaks["matmul_bf16_flops"]
      if cuda:
        out[f"{impl}/peak_device_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as e:  # one implementation missing must not hide the other
      out[f"{impl}/error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
      model = opt = None
      gc.collect()
      if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
  best = [out[k] for k in out if k.endswith("/tokens_per_s")]
  if best:
    out["best_tokens_per_s"] = max(best)
  return out


def grouped_gemm(n_experts: int = 64, tokens: int = 16384, top_k: int = 6, d: int = 1024,
                 f: int = 512, repeats: int = 10) -> dict:
  """Forward + backward of silu(x Wg) * (x Wu) Wd over rows sorted by expert (balanced
  group sizes, as the bias aims for), per grouped-matmul implementation."""
  from deepseek_jax.model import dispatch
  rows = tokens * top_k
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (rows, d), jnp.bfloat16)
  wg, wu = (0.02 * jax.random.normal(k, (n_experts, d, f), jnp.bfloat16) for k in keys[1:3])
  wd = 0.02 * jax.random.normal(keys[3], (n_experts, f, d), jnp.bfloat16)
  sizes = np.full(n_experts, rows // n_experts, np.int32)
  sizes[: rows % n_experts] += 1
  sizes = jnp.asarray(sizes)
  flops = 3 * 2 * rows * d * f * 3  # 3 projections, forward + 2 backward products each
  out = {}
  for impl in ("tokamax", "xla"):
    def loss(x, wg, wu, wd, impl=impl):
      mm = lambda a, w: dispatch.grouped_matmul(a, w, sizes, impl)
      h = jax.nn.silu(mm(x, wg)) * mm(x, wu)
      return jnp.sum(mm(h, wd).astype(jnp.float32))
    try:
      fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
      s = _median_s(lambda: jax.block_until_ready(fn(x, wg, wu, wd)), repeats)
      out[f"{impl}/fwd_bwd_ms"] = 1e3 * s
      out[f"{impl}/tflops"] = flops / s / 1e12
    except Exception as e:
      out[f"{impl}/error"] = f"{type(e).__name__}: {e}"[:500]
  if "tokamax/fwd_bwd_ms" in out and "xla/fwd_bwd_ms" in out:
    out["tokamax_speedup_vs_xla"] = out["xla/fwd_bwd_ms"] / out["tokamax/fwd_bwd_ms"]
  return out


def run(parts, batch: int, seq: int, repeats: int, profile_dir: str | None, deadline_s: float,
        save, tiny: bool = False, variants=None) -> dict:
  """The parts in order, each guarded; save(results) after each. Past deadline_s of
  wall time the remaining parts are skipped (recorded as such)."""
  t0 = time.perf_counter()
  results = {"jax_version": jax.__version__, "backend": jax.default_backend()}

  def part(name, fn):
    if time.perf_counter() - t0 > deadline_s:
      results[f"{name}/skipped"] = f"past the {deadline_s:.0f} s deadline"
    else:
      t = time.perf_counter()
      try:
        results.update({f"{name}/{k}": v for k, v in fn().items()})
      except Exception as e:
        results[f"{name}/error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
      results[f"{name}/wall_s"] = time.perf_counter() - t
    save(results)

  peaks = bf16_matmul_peak(n=256 if tiny else 8192)
  results.update(peaks)
  save(results)
  # The reference first: torch returns its memory when done (empty_cache), while JAX's
  # allocator keeps what the train variants took (75 GB for torch beside 55 GB of ours).
  if "hf" in parts:
    part("hf", lambda: hf_reference(batch, seq, max(3, repeats // 2), peaks, tiny=tiny))
  if "train" in parts:
    chosen = [v for v in TRAIN_VARIANTS if not variants or v[0] in variants]
    profiled = False
    for name, attention, experts, strategy in chosen:
      # The first variant that runs is the one profiled.
      part(f"train/{name}", lambda a=attention, e=experts, s=strategy, p=profiled:
           train_variant(a, e, s, batch, seq, repeats, peaks, None if p else profile_dir,
                         tiny))
      profiled = profiled or f"train/{name}/tokens_per_s" in results
  if "gemm" in parts:
    part("gemm", lambda: grouped_gemm(**(dict(n_experts=8, tokens=64, d=32, f=16, repeats=2)
                                         if tiny else {})))
  if "decode" in parts:
    from deepseek_jax.bench import decode_speed

    # Absorbed vs naive at 4k context, and speculation vs plain greedy decoding through
    # decode loop and serving engine on a drafter trained here (the CPU bench's part):
    # whether verifying D+1 tokens costs about one step where a step reads its weights
    # from HBM (engine_speculative_round_over_step_depth_k) is the GPU's question.
    part("decode", lambda: decode_speed.run(tiny=tiny, repeats=repeats))
  # The summary's step: the first bias variant (in TRAIN_VARIANTS order) that ran.
  ran = [f"train/{v[0]}" for v in TRAIN_VARIANTS
         if v[3] == "bias" and f"train/{v[0]}/tokens_per_s" in results]
  if ran:
    main = results["summary_variant"] = ran[0]
    hf_best = results.get("hf/best_tokens_per_s")
    if hf_best:
      results["speedup_vs_hf"] = results[f"{main}/tokens_per_s"] / hf_best
    bias_s = results[f"{main}/step_s"]
    if f"{main}/aux/step_s" in results:
      results["aux_over_bias_step_time"] = results[f"{main}/aux/step_s"] / bias_s
  results["wall_s"] = time.perf_counter() - t0
  save(results)
  return results
