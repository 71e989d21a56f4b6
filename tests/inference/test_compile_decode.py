"""The serving compile (inference/compile_decode.py, max_batch.py) on a small config:
the MHA counterfactual's cache read off its compiled program, int8 weights, and the
largest batch found by compiling. Needs libtpu (the `tpu` extra) except the search's
own test."""

import os
import subprocess
import sys

import pytest

from configs import tpu_smoke
from deepseek_jax.inference import compile_decode, max_batch
from deepseek_jax.model.config import model_config_from
from deepseek_jax.train import aot_memory, sharding, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = model_config_from(tpu_smoke.get_config().model).replace(
    dtype="bfloat16", param_dtype="bfloat16")
MESH = {"data": 1, "fsdp": 1, "expert": -1, "context": 1, "tensor": 2}


@pytest.mark.parametrize("step", [1, 4, 128])
def test_search_finds_the_largest_multiple_of_step_in_few_tries(step):
  for answer in range(0, 40 * step, step):
    for guess in (1, step, answer or 1, 3 * answer + 1, 17 * step):
      tried = []
      fits = lambda b: tried.append(b) or b <= answer
      n, trail = max_batch.search(fits, guess, step)
      assert n == answer, (answer, guess, trail)
      assert all(b % step == 0 for b in tried) and len(set(tried)) == len(tried)
      assert len(tried) <= 2 * (40 * 17).bit_length() + 2, (answer, guess, trail)
  with pytest.raises(ValueError, match="step and guess must be >= 1"):
    max_batch.search(lambda b: True, 0, step)


libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="TPU compilation needs libtpu: pip install -e '.[tpu]'")


@libtpu
def test_mha_counterfactual_caches_per_head_kv_in_its_compiled_program():
  """The same step with per-head K and V cached: L x N x (K + O) x 2 bytes a token in
  the MHA program's cache argument (heads over tensor=2, requests over the rest), the
  latent's L x (R + P) x 2 in the MLA program's; the ratio is the two programs'."""
  r = compile_decode.decode_report(SMOKE, "v5p:2x2x2", 16, 1024, MESH, mha=True)
  m = SMOKE
  mla = m.n_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 2
  mha = m.n_layers * m.n_heads * (m.qk_head_dim + m.v_head_dim) * 2
  assert r["cache_bytes_per_token"] == mla == r["analytic_cache_bytes_per_token"]
  assert r["mha_cache_bytes_per_token"] == mha
  assert r["mha_over_mla_cache_bytes"] == pytest.approx(mha / mla)
  assert r["cache_bytes_from"] == r["mha"]["cache_bytes_from"] == (
      "the compiled program's cache argument")
  h = r["mha"]
  assert h["fits_hbm"] and r["fits_hbm"] and h["request_shards"] == 4
  assert r["request_shards"] == 8
  assert h["per_chip_bytes"]["cache"] * r["n_chips"] == 16 * 1024 * mha
  assert h["per_chip_bytes"]["weights"] == r["per_chip_bytes"]["weights"]
  assert h["roofline"]["step_s"] > r["roofline"]["step_s"]
  assert "MHA / MLA cache bytes a token" in compile_decode.format_decode_report(r)


@libtpu
def test_int8_weights_report_the_int8_programs_bytes():
  """weights="int8": a chip holds int8 matmul weights and their scales, a little over
  half the bf16 bytes (the scales and the float norms and router on top)."""
  r = compile_decode.decode_report(SMOKE, "v5p:2x2x2", 16, 1024, MESH, weights="int8")
  mesh = sharding.make_mesh(MESH, tpu.topology_devices("v5p:2x2x2"), SMOKE.d_model)
  _, bf16, _ = compile_decode.abstract_params(SMOKE.replace(scan_layers=False), mesh)
  ratio = r["per_chip_bytes"]["weights"] / aot_memory.per_chip_bytes(bf16)
  assert r["fits_hbm"] and r["weights"] == "int8"
  assert 0.5 < ratio < 0.65, ratio


@libtpu
def test_find_max_batch_compiles_a_few_times():
  """At 32M positions a request's latents are 6 GiB: a v5p chip holds about a dozen, so
  from a guess of 32 requests (4 request shards) the search brackets and bisects in a
  few compiles; the report is at the batch it found, one step more does not fit."""
  mesh = {**MESH, "tensor": 1}
  context = 1 << 25
  r = compile_decode.decode_report(SMOKE, "v5p:2x2x1", 32, context, mesh,
                                   find_max_batch=True)
  n, trail = r["max_batch"][str(context)], r["search"]
  tried = {b: ok for b, ok, *_ in trail}
  assert n > 0 and n % 4 == 0 and tried[n] and not tried[n + 4], trail
  assert r["batch"] == n and r["fits_hbm"] and len(trail) <= 6, trail
  assert r["per_chip_bytes"]["cache"] * r["n_chips"] == n * context * 192


def test_serving_flags_that_do_not_go_together_say_so():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.compile", "--config=configs/tpu_smoke.py",
       "--topology=v5p:2x2x1", "--mode=prefill", "--mha"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode != 0
  assert "--mha and --find_max_batch go with --mode=decode only" in proc.stderr + proc.stdout
