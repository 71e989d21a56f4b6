"""The benchmark command: a tiny smoke run (every part), the decode benchmark helpers,
and the FLOP formula against a hand count."""

import json
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax.model import config
from deepseek_jax.train.metrics import train_flops_per_token
from train_helpers import subprocess_env


def _train_flops_per_token_by_hand(c, T):
  """3 x forward: 2 FLOPs a weight a token multiplies (routed experts K of E, router, head;
  one MTP module of projection, block and shared head), plus the causal attention."""
  assert c.mtp_depth in (0, 1)
  D, N, H, P, O, R, Q, V = (c.d_model, c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
                            c.v_head_dim, c.kv_lora_rank, c.q_lora_rank, c.vocab_size)
  attn_w = D * Q + Q * N * (H + P) + D * (R + P) + R * N * (H + O) + N * O * D
  moe_w = 3 * D * c.moe_ffn_dim * (c.n_shared_experts + c.top_k) + D * c.n_routed_experts
  dense_w = 3 * D * c.ffn_dim
  n_moe = c.n_layers - c.first_k_dense
  main = c.n_layers * attn_w + c.first_k_dense * dense_w + n_moe * moe_w + D * V
  mtp = (2 * D * D + attn_w + moe_w + D * V) * c.mtp_depth   # projection, block, head
  attn_scores = 2 * N * (H + P + O) * T / 2          # QK^T and PV over T/2 causal keys
  forward = 2 * (main + mtp) + (c.n_layers + c.mtp_depth) * attn_scores
  return 3 * forward


def test_flop_formula_matches_hand_count():
  c = config.tiny().replace(mtp_depth=1)
  assert train_flops_per_token(c, 16) == pytest.approx(
      _train_flops_per_token_by_hand(c, 16), rel=1e-12)


def _assert_bench_relations(res):
  """What the smoke run's numbers must satisfy whatever the machine's speed: each rate
  and ratio is the one its measured times give (run_all's tiny sizes: train batch 2 x
  32 tokens on the tiny bench model, the SwiGLU chain of 2 layers, 64 tokens, D 32, F 64)."""
  from deepseek_jax.bench import data_speed, train_speed
  tokens, step_s, peak = 2 * 32, res["train_step_s"], res["matmul_peak_flops"]
  flops = _train_flops_per_token_by_hand(train_speed._bench_or_tiny_config(True), 32) * tokens
  assert res["model_flops_per_step"] == pytest.approx(flops, rel=1e-9)
  assert res["train_tokens_per_s"] == pytest.approx(tokens / step_s, rel=1e-9)
  assert res["mfu"] == pytest.approx(flops / step_s / peak, rel=1e-9)
  chain_flops = (9 * 2 - 2) * 2 * 64 * 32 * 64
  assert res["xla_ceiling_mfu"] == pytest.approx(
      chain_flops / res["xla_ceiling_step_s"] / peak, rel=1e-9)
  assert res["mfu_vs_xla_ceiling"] == pytest.approx(res["mfu"] / res["xla_ceiling_mfu"],
                                                    rel=1e-9)
  for path in ("dropless", "capacity"):
    assert res[f"moe_{path}_ratio_256_vs_8"] == pytest.approx(
        res[f"moe_{path}_E256_s"] / res[f"moe_{path}_E8_s"], rel=1e-9)
  assert res["moe_time_ratio_256_vs_8"] == res["moe_dropless_ratio_256_vs_8"]
  # Decode times are reported to 1 us and the speedup to 2 decimals.
  naive, absorbed = res["decode_naive_ms_4k"], res["decode_absorbed_ms_4k"]
  assert res["decode_speedup_absorbed_vs_naive_4k"] == pytest.approx(
      naive / absorbed, abs=0.006 + (naive + absorbed) / absorbed ** 2 * 5e-4)
  assert res["speculative_speedup"] == pytest.approx(
      res["speculative_tokens_per_s"] / res["plain_decode_tokens_per_s"], rel=1e-9)
  assert res["data_vs_train_tokens_ratio"] == pytest.approx(
      res["data_tokens_per_s"] / res["train_tokens_per_s"], rel=1e-9)
  need = 15_360 * 4_096 / 128 / data_speed.V5P_512_STEP_S   # V3's batch, 128 v5p hosts
  assert res["data_v5p_host_needed_tokens_per_s"] == pytest.approx(need, rel=1e-9)
  assert res["data_v5p_host_margin"] == pytest.approx(
      res["data_v5p_host_tokens_per_s"] / need, rel=1e-9)
  if "hf_train_step_s" in res:
    assert res["hf_train_tokens_per_s"] == pytest.approx(tokens / res["hf_train_step_s"])
    assert res["train_speedup_vs_hf"] == pytest.approx(
        res["hf_train_step_s"] / step_s, rel=1e-9)
    assert res["hf_mfu"] == pytest.approx(flops / res["hf_train_step_s"] / peak, rel=1e-9)


def test_bench_smoke_run(tmp_path):
  out = tmp_path / "bench.json"
  r = subprocess.run([sys.executable, "-m", "experiments.bench", "--tiny", f"--out={out}",
                      "--parts=train,moe,decode,data", "--repeats=2",
                      f"--profile_dir={tmp_path / 'trace'}"],
                     env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  for key in ("train_tokens_per_s", "mfu", "matmul_peak_flops", "compile_s",
              "xla_ceiling_mfu", "mfu_vs_xla_ceiling",
              "dropped_frac", "moe_time_ratio_256_vs_8",
              "decode_speedup_absorbed_vs_naive_4k", "speculative_speedup",
              "speculative_acceptance", "peak_host_memory_bytes", "data_tokens_per_s",
              "data_vs_train_tokens_ratio", "data_v5p_host_margin"):
    assert key in res, key
    assert np.isfinite(res[key]), key
  assert res["dropped_frac"] == 0.0
  assert res["speculative_exact"] is True   # greedy drafts never change the output
  for depth in (1, 2, 3):   # the serving engine's rounds, the module chained past 1
    assert res[f"engine_speculative_exact_depth_{depth}"] is True
    assert np.isfinite(res[f"engine_speculative_speedup_depth_{depth}"])
    assert 1.0 <= res[f"engine_speculative_tokens_per_round_depth_{depth}"] <= depth + 1
    assert res[f"engine_speculative_round_over_step_depth_{depth}"] > 0
    # Acceptance is the tokens a round past the main model's own, over the drafts.
    assert res[f"engine_speculative_acceptance_depth_{depth}"] == pytest.approx(
        (res[f"engine_speculative_tokens_per_round_depth_{depth}"] - 1) / depth, rel=1e-9)
  # The profile attributes op time to model parts, forward and backward.
  for part in ("attention", "moe_routed", "dense_ffn"):
    for direction in ("fwd", "bwd"):
      assert res[f"profile_{part}/{direction}_ms"] > 0, (part, direction)
  assert res["profile_total_op_ms"] >= res["profile_attention/fwd_ms"]
  assert 0.0 <= res["speculative_acceptance"] <= 1.0
  _assert_bench_relations(res)
  try:
    import transformers  # noqa: F401
    for key in ("hf_train_tokens_per_s", "train_speedup_vs_hf"):
      assert np.isfinite(res[key]), key
  except ImportError:
    pass


def test_decode_bench_rows_on_tiny_models():
  from deepseek_jax.bench import decode_speed as bd
  from deepseek_jax.model.transformer import Transformer
  import jax
  import jax.numpy as jnp
  row, = bd.absorbed_vs_naive((64,), repeats=1, tiny=True)
  assert row["context"] == 64 and row["absorbed_ms"] > 0 and row["naive_ms"] > 0
  naive, absorbed = bd.attention_gflop_per_layer(bd.absorb_config(), 4096)
  assert naive > 3 * absorbed          # the reason absorption pays at long context
  # Speculation on an untrained 2-deep MTP model: still exact, at each depth.
  model = Transformer(config.tiny())
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  res = bd.speculative_vs_plain(model, v, [[1, 2, 3, 4], [5, 6, 7]], 6, repeats=1, batch=2)
  assert set(res) == {"plain", "mtp_depth_1", "mtp_depth_2"}
  for depth in (1, 2):
    r = res[f"mtp_depth_{depth}"]
    assert r["same_tokens_as_plain"], r
    assert len(r["acceptance_per_depth"]) == depth
    assert 1.0 <= r["tokens_per_round"] <= depth + 1
  layouts = {r["layout"]: r for r in bd.kv_bytes()}
  assert layouts["MLA"]["values_per_token_layer"] == 576   # (512 + 64) at V3's sizes


def test_xla_ceiling_chain_flop_count_matches_the_compiler():
  """The ceiling's MFU numerator: the matmul FLOPs the plain SwiGLU chain runs (no input
  gradient for the first layer's gate and up), against XLA's own count for its compiled
  step (which adds the elementwise work, a few percent at these widths)."""
  from deepseek_jax.bench.train_speed import SwiGLUChain
  chain = SwiGLUChain(layers=2, tokens=64, d=128, f=256)
  assert chain.flops == (3 * 2 * 3 - 2) * 2 * 64 * 128 * 256
  cost = chain.fn.lower(chain.w, chain.x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert chain.flops <= cost["flops"] <= 1.1 * chain.flops
  chain.step()                       # runs, and the donated weights are replaced
  assert all(np.isfinite(np.asarray(w)).all() for w in chain.w)


def test_gpu_bench_smoke_run_on_cpu(tmp_path):
  """scripts/gpu_bench.sh's program at tiny sizes on the CPU (cuDNN's config falls back
  to jax.nn's XLA attention, tokamax picks its XLA paths): every path it times runs and
  the JSON carries the numbers the GPU run reports. The GPU itself is issue 22's."""
  out = tmp_path / "gpu.json"
  r = subprocess.run([sys.executable, "-m", "experiments.gpu_bench", "--tiny", f"--out={out}",
                      "--parts=train,gemm", "--repeats=1", "--variants=cudnn+tokamax"],
                     env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert not [k for k in res if k.endswith("/error")], res
  # One train variant (the others differ by config only; all ran in `--tiny` by hand:
  # docs/gpu.md, "The measurement"): the default paths, and the grouped GEMM part.
  for key in ("train/cudnn+tokamax/tokens_per_s", "train/cudnn+tokamax/mfu_vs_measured_matmul",
              "train/cudnn+tokamax/compile_s", "gemm/tokamax/fwd_bwd_ms",
              "gemm/xla/fwd_bwd_ms", "matmul_bf16_flops"):
    assert np.isfinite(res[key]) and res[key] > 0, key
  assert 4.0 < res["train/cudnn+tokamax/loss"] < 7.0   # ~ln(256) after 3 tiny steps


def test_profile_attributes_cpu_ops_and_gpu_kernels_to_model_parts():
  """A trace's op times go to the model part named by each instruction's op_name: by the
  event's hlo_op (XLA:CPU, TPU), or, where hlo_op names a CUDA-graph command buffer (seen
  on the H200), by the kernel's name, which is the fusion's HLO name with '.' -> '_'."""
  from deepseek_jax.bench import profiling
  hlo = "\n".join([
      '  %fusion.3 = f32[4] fusion(%p), op_name="jit(step)/jvp(T)/layer_1/attn/dot_general"',
      '  %gemm_fusion_dot.518 = bf16[8] fusion(%q), kind=kCustom, metadata={op_name='
      '"jit(step)/transpose(jvp(T))/layer_9/moe/while/body/dot_general"}',
      '  ROOT %loop-add_fusion.2 = f32[8] fusion(%r), op_name="jit(step)/jvp(T)/layer_2/ffn/add"',
  ])
  ev = lambda name, op, dur: {"ph": "X", "name": name, "dur": dur, "args": {"hlo_op": op}}
  events = [ev("fusion.3", "fusion.3", 3000.0),                      # CPU: hlo_op itself
            ev("gemm_fusion_dot_518", "command_buffer_7", 6000.0),   # GPU: kernel name
            ev("loop_add_fusion_2", "command_buffer_7", 1500.0),
            ev("cudnn_sdpa_kernel", "command_buffer_7", 900.0),      # a library's kernel
            {"ph": "X", "name": "host work", "dur": 1e6, "args": {}},  # no hlo_op: host
            {"ph": "M", "name": "process_name", "args": {"hlo_op": "fusion.3"}}]
  by_part = profiling.op_ms_by_part(events, hlo, calls=3)
  assert dict(by_part) == pytest.approx({"attention/fwd": 1.0, "moe_routed/bwd": 2.0,
                                         "dense_ffn/fwd": 0.5, "other/fwd": 0.3})
