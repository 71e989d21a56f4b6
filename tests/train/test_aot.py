"""TPU compilation on this CPU host (train/aot.py, experiments.compile): a V3-shaped model
compiled for a v5p slice, the report's fields, the loop-aware collective count, and the
exit status of a model that cannot fit. Needs libtpu (the `tpu` extra)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from configs import tpu_smoke
from deepseek_jax.model import layers
from deepseek_jax.model.config import model_config_from
from deepseek_jax.model.param_count import count_params
from deepseek_jax.train import (aot, aot_routing, aot_work, hlo, hlo_collectives,
                                hlo_work, program, sharding, tpu)

pytest.importorskip("libtpu", reason="TPU compilation needs libtpu: pip install -e '.[tpu]'")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def v3_shaped_config():
  return tpu_smoke.get_config()


def test_topology_names():
  assert tpu.parse_topology("v5p:8x16x16") == ("v5p", (8, 16, 16))
  assert tpu.parse_topology("v6e:16x16") == ("v6e", (16, 16))
  for bad in ("v5p:8x16", "v7:2x2", "tpu", "v6e:4x4x4"):
    with pytest.raises(tpu.TopologyError, match="topology"):
      tpu.parse_topology(bad)


def test_mesh_that_does_not_match_the_chips_is_an_error():
  c = v3_shaped_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 3, 2, 2
  with pytest.raises(ValueError, match="there are 4 devices"):
    aot.report(c, "v5p:2x2x1")


def test_pod_programs_take_the_einsum_layout():
  """Traced under a mesh of TPU devices on this CPU host, layers.linear builds the
  einsum, not XLA:CPU's flat 2-D product (which cost the 671B its pod fit)."""
  mesh = Mesh(np.array(tpu.topology_devices("v5p:2x2x1")), ("d",))
  with jax.set_mesh(mesh):
    assert layers.target_platform() == "tpu" and not layers.flat_matmuls()


def test_collectives_count_loop_trips():
  """A psum inside an 8-step scan moves 8 x its buffer: the count multiplies by the
  loop's trip count, where XLA's cost analysis counts the body once."""
  devices = tpu.topology_devices("v5p:2x2x1")
  mesh = Mesh(np.array(devices), ("d",))

  def body(x, w):
    y = jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=PS("d"),
                      out_specs=PS())(x @ w)
    return x + y[: x.shape[0]].sum() * 0, None

  def f(x, ws):
    return jax.lax.scan(body, x, ws)[0]

  x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, PS("d")))
  ws = jax.ShapeDtypeStruct((8, 512, 512), jnp.float32, sharding=NamedSharding(mesh, PS()))
  h = hlo.read_hlo(jax.jit(f).lower(x, ws).compile().as_text())
  assert 8 in h.trips
  got = hlo_collectives.collective_bytes(h)["all-reduce"]
  assert got == 8 * 64 * 512 * 4, got   # each step all-reduces one [64, 512] f32 shard


GUARD_TOPOLOGY = "v5p:2x2x2"


@pytest.fixture(scope="module")
def guard_report(tmp_path_factory):
  """experiments.compile on the pod-shaped guard config (configs/tpu_smoke.py:guard):
  scanned layers, remat, blockwise attention, ragged experts, expert and tensor axes,
  microbatches; compiled once for both tests below."""
  tmp = tmp_path_factory.mktemp("aot")
  out, hlo_file = tmp / "report.json", tmp / "step.hlo"
  cmd = [sys.executable, "-m", "experiments.compile", f"--topology={GUARD_TOPOLOGY}",
         "--config=configs/tpu_smoke.py:guard", f"--out={out}", f"--dump_hlo={hlo_file}"]
  # The TPU compiler with its default options, as experiments.compile runs for a pod
  # (no test-only XLA flags: conftest's fast-compile flag would reach the TPU backend).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout, json.loads(out.read_text()), hlo_file.read_text()


def test_compile_v3_shaped_model_for_a_v5p_host(guard_report):
  stdout, r, _ = guard_report
  assert "fits_hbm: true" in stdout
  assert "ROOFLINE" in stdout and "MFU <=" not in stdout
  for key in ("topology", "n_chips", "mesh", "per_chip_bytes", "hbm_bytes_per_chip",
              "fits_hbm", "compile_s", "xla_cost_analysis", "collective_bytes",
              "model_flops_per_step", "executed_flops_per_chip", "useful_flops_per_chip",
              "flops_by_class", "hbm_traffic_bytes_per_chip", "roofline"):
    assert key in r, key
  assert r["n_chips"] == 8 and r["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "context": 1,
                                             "tensor": 2}
  b = r["per_chip_bytes"]
  # Against the analytic parameter count (model/param_count.py), fp32: sharded, a chip
  # holds at least 1/n of the weights and at most all of them.
  n_params = count_params(model_config_from(tpu_smoke.get_config("guard").model))["total"]
  assert 4 * n_params / r["n_chips"] <= b["params"] < 4 * n_params
  # AdamW: two fp32 moments per fp32 parameter, sharded alike.
  assert b["optimizer"] == pytest.approx(2 * b["params"], rel=0.01)
  assert b["params"] + b["optimizer"] <= b["arguments"]
  assert 0 < b["total"] < r["hbm_bytes_per_chip"]
  assert set(r["collective_bytes"]) == set(hlo_collectives.COLLECTIVES)
  # fsdp gathers weights.
  assert r["collective_bytes"]["all-gather"] > 0
  # Executed work: the useful FLOPs are the analytic count's share of a chip, split by
  # class; what a chip executes of each class is at least that (attention counts its
  # live causal tiles, so a little more than the T/2 average) and the routed experts,
  # with megablox over the live rows of the ragged exchange, little more.
  assert r["useful_flops_per_chip"] == pytest.approx(r["model_flops_per_step"] / 8)
  by = r["flops_by_class"]
  assert set(by) == set(hlo_work.CLASSES) | {"remat_recompute"}
  assert sum(v["useful"] for v in by.values()) == pytest.approx(r["useful_flops_per_chip"])
  for k in hlo_work.CLASSES:
    assert by[k]["useful"] > 0 and 0.99 <= by[k]["executed"] / by[k]["useful"] < 1.15, k
  # The guard rematerialises with dots_no_batch: the routed experts' products are not
  # saved, so (some of) their forward runs again: at most the forward's third of the work.
  assert 0 < by["routed_experts"]["recomputed"] <= by["routed_experts"]["useful"] / 3
  assert by["remat_recompute"]["useful"] == 0
  assert by["remat_recompute"]["executed"] == pytest.approx(
      sum(by[k]["recomputed"] for k in hlo_work.CLASSES))
  assert r["executed_flops_per_chip"] == pytest.approx(
      sum(v["executed"] for v in by.values()))
  rf = r["roofline"]
  assert rf["step_s"] == max(rf["compute_s"], rf["hbm_s"], rf["ici_s"]) > 0
  assert rf["compute_s"] == pytest.approx(
      r["executed_flops_per_chip"] / tpu.CHIPS["v5p"].peak_flops)
  assert 0 < rf["mfu"] < 1
  assert r["collective_bytes"]["ragged-all-to-all"] > 0     # the ragged exchange


def test_pod_shaped_step_stays_within_a_budget_from_its_sizes(guard_report):
  """The guard for the 671B's pod fit: a change that makes the partitioner keep more
  than a few [tokens, V] logits buffers per chip fails here, where the 671B would fail on
  the pod. A 2-D (flattened) logits product takes this step from 547 to 941 MiB per chip
  against a 694 MiB budget (docs/history.md, "the pod fit lost and restored")."""
  _, r, _ = guard_report
  c = tpu_smoke.get_config("guard")
  m = model_config_from(c.model)
  mesh = r["mesh"]
  batch_shards = mesh["data"] * mesh["fsdp"] * mesh["expert"]
  seqs_per_chip = c.batch_size // r["microbatches"] // batch_shards
  assert seqs_per_chip == 1            # one sequence per shard per microbatch, as the 671B
  # One f32 [tokens, V / tensor] logits buffer per chip, per output head (main + MTP).
  logits = seqs_per_chip * c.seq_len * (m.vocab_size // mesh["tensor"]) * 4
  heads = 1 + m.mtp_depth
  # The config makes the logits dominate: a token's logits outweigh its activations in
  # every layer together (bf16, a generous 16 d_model-sized tensors per layer).
  assert m.vocab_size // mesh["tensor"] * 4 > 16 * m.d_model * 2 * m.n_layers
  b = r["per_chip_bytes"]
  # The state (arguments) and its gradient-sized buffers, each head's logits and their
  # gradient, and one more logits-sized buffer for everything else.
  budget = 2 * b["arguments"] + (2 * heads + 1) * logits
  assert b["total"] <= budget, (
      f"{b['total'] / 2**20:.1f} MiB per chip over a {budget / 2**20:.1f} MiB budget "
      f"(logits buffer {logits / 2**20:.1f} MiB): temporaries {b['temporaries'] / 2**20:.1f} MiB")


def test_model_that_cannot_fit_exits_1_and_says_by_how_much(tmp_path):
  cmd = [sys.executable, "-m", "experiments.compile", "--topology=v5p:2x2x1",
         "--config=configs/tpu_smoke.py", "--config.mesh.data=4",
         "--config.mesh.fsdp=1", "--config.mesh.expert=1",
         # a 7.8G-parameter embedding + head, replicated on every chip with AdamW
         "--config.model.vocab_size=1000000", "--config.model.d_model=4096",
         "--config.model.n_heads=2", "--config.model.mtp_depth=0",
         f"--out={tmp_path / 'r.json'}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "fits_hbm: false" in proc.stdout
  assert "over by" in proc.stdout
  r = json.loads((tmp_path / "r.json").read_text())
  assert r["fits_hbm"] is False


def test_routing_counts_cost_rounds_and_the_hot_shards_work(guard_report, tmp_path):
  """--routing_counts: the guard's 8 experts on expert=2 shards; loads that send 120 of
  124 assignments a layer to shard 0's four experts make it receive 1.94x the balanced
  1,024 rows, past its 1,280-row buffer: 2 rounds in every layer, and the routed
  experts' executed work grows (hottest shard's full buffer, and the overflow round)."""
  _, r, text = guard_report
  c = tpu_smoke.get_config("guard")
  m = model_config_from(c.model)
  mesh = sharding.make_mesh(c.mesh, tpu.topology_devices(GUARD_TOPOLOGY), m.d_model)
  c = program.resolve_microbatches(c, mesh)
  path = tmp_path / "metrics.jsonl"
  skew = [30, 30, 30, 30, 1, 1, 1, 1]
  path.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n"
                  + json.dumps({"step": 2, "val_load": [skew, skew]}) + "\n")
  counts = aot_routing.read_routing_counts(str(path))
  g = aot_routing.routing_rounds(counts, c, m, mesh)
  assert g["balanced_rows"] == 1024 and g["buffer_rows"] == 1280
  assert g["hot_shard_load"] == [pytest.approx(2 * 120 / 124, abs=1e-4)] * 2
  assert g["rounds"] == [2, 2] and g["mean_extra_rounds"] == 1
  assert g["mean_first_round_rows"] == 1280
  chip = tpu.CHIPS["v5p"]
  live = aot_routing.routed_rows_per_buffer(c, m, mesh)
  skewed = aot_work.work_report(text, c, m, chip, 8, live, g)
  balanced = aot_work.work_report(text, c, m, chip, 8, live)
  assert balanced["executed_flops_per_chip"] == pytest.approx(r["executed_flops_per_chip"])
  routed = lambda w: w["flops_by_class"]["routed_experts"]["executed"]
  assert routed(skewed) > 2 * routed(balanced)
  with pytest.raises(ValueError, match="4 experts per layer, but the model has 8"):
    aot_routing.routing_rounds(counts[:, :4], c, m, mesh)
  # Without live rows (experiments.hlo_report on another program): each kernel's whole
  # grid, at least the live rows' work.
  whole = aot_work.work_report(text, c, m, chip, 8, None)
  assert routed(whole) >= routed(balanced)


def test_context_parallel_report_reads_the_latent_gather_from_the_program(tmp_path):
  """A context axis: the report finds the all-gathers of MLA's latent (R + P wide) in
  the compiled TPU program, prices per-head K/V against them, and shows the zig-zag
  layout's causal tiles equal over the shards where contiguous ones are not."""
  out = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "experiments.compile", f"--topology={GUARD_TOPOLOGY}",
         "--config=configs/tpu_smoke.py", "--config.mesh.context=2", f"--out={out}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  r = json.loads(out.read_text())
  c = r["context"]
  m = model_config_from(tpu_smoke.get_config().model)
  assert r["mesh"]["context"] == 2 and c["latent_width"] == m.kv_lora_rank + m.qk_rope_head_dim
  # Every layer's forward gathers its latent (the remat's recompute may add more).
  assert c["latent_gathers_per_step"] >= m.n_layers + m.mtp_depth
  assert all(s.endswith(f",{c['latent_width']}]") for s in c["latent_gather_shapes"])
  heads = m.n_heads // r["mesh"]["tensor"]
  width = heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
  assert c["per_head_kv_bytes_per_chip"] == pytest.approx(
      c["latent_bytes_per_chip"] * width / c["latent_width"]) and c["latent_bytes_per_chip"] > 0
  t = c["shard_live_tiles"]
  assert len(set(t["zigzag"])) == 1 and t["contiguous"][0] < t["contiguous"][1]
  assert "all-gathers of the latent" in proc.stdout


def test_decode_step_report_for_a_v5p_host(tmp_path):
  """experiments.compile --mode=decode: one cached decode step compiled for TPU; the
  cache a chip holds is its share of the requests' latents (bf16: L x (R + P) x 2 bytes
  a token, one copy at tensor 1), the weights a chip holds are at least its share, and
  the roofline follows from those bytes and the chip's HBM bandwidth."""
  out = tmp_path / "decode.json"
  cmd = [sys.executable, "-m", "experiments.compile", f"--topology={GUARD_TOPOLOGY}",
         "--config=configs/tpu_smoke.py", "--mode=decode", "--batch=16", "--context=1024",
         f"--out={out}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  r = json.loads(out.read_text())
  m = model_config_from(tpu_smoke.get_config().model)
  per_token = m.n_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 2
  assert r["analytic_cache_bytes_per_token"] == per_token == r["cache_bytes_per_token"]
  b = r["per_chip_bytes"]
  assert b["cache"] * r["n_chips"] == 16 * 1024 * per_token
  n_params = count_params(m)["total"]
  assert 2 * n_params / r["n_chips"] <= b["weights"] < 2 * n_params
  assert r["fits_hbm"] and b["total"] >= b["weights"] + b["cache"]
  rf = r["roofline"]
  assert rf["step_s"] == pytest.approx(
      (b["weights"] + b["cache"]) / tpu.CHIPS["v5p"].hbm_bw)
  assert rf["tokens_per_s_per_chip"] == pytest.approx(16 / rf["step_s"] / r["n_chips"])
  assert "decode on v5p:2x2x2" in proc.stdout
