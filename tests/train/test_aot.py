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
from deepseek_jax.model.config import model_config_from
from deepseek_jax.model.param_count import count_params
from deepseek_jax.train import aot

pytest.importorskip("libtpu", reason="TPU compilation needs libtpu: pip install -e '.[tpu]'")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def v3_shaped_config():
  return tpu_smoke.get_config()


def test_topology_names():
  assert aot.parse_topology("v5p:8x16x16") == ("v5p", (8, 16, 16))
  assert aot.parse_topology("v6e:16x16") == ("v6e", (16, 16))
  for bad in ("v5p:8x16", "v7:2x2", "tpu", "v6e:4x4x4"):
    with pytest.raises(aot.TopologyError, match="topology"):
      aot.parse_topology(bad)


def test_mesh_that_does_not_match_the_chips_is_an_error():
  c = v3_shaped_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 3, 2, 2
  with pytest.raises(ValueError, match="there are 4 devices"):
    aot.report(c, "v5p:2x2x1")


def test_collectives_count_loop_trips():
  """A psum inside an 8-step scan moves 8 x its buffer: the count multiplies by the
  loop's trip count, where XLA's cost analysis counts the body once."""
  devices = aot.topology_devices("v5p:2x2x1")
  mesh = Mesh(np.array(devices), ("d",))

  def body(x, w):
    y = jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=PS("d"),
                      out_specs=PS())(x @ w)
    return x + y[: x.shape[0]].sum() * 0, None

  def f(x, ws):
    return jax.lax.scan(body, x, ws)[0]

  x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, PS("d")))
  ws = jax.ShapeDtypeStruct((8, 512, 512), jnp.float32, sharding=NamedSharding(mesh, PS()))
  hlo = aot.read_hlo(jax.jit(f).lower(x, ws).compile().as_text())
  assert 8 in hlo.trips
  got = aot.collective_bytes(hlo)["all-reduce"]
  assert got == 8 * 64 * 512 * 4, got   # each step all-reduces one [64, 512] f32 shard


def test_compile_v3_shaped_model_for_a_v5p_host(tmp_path):
  out = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "experiments.compile", "--topology=v5p:2x2x1",
         "--config=configs/tpu_smoke.py", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "fits_hbm: true" in proc.stdout
  assert "ESTIMATE" in proc.stdout
  r = json.loads(out.read_text())
  for key in ("topology", "n_chips", "mesh", "per_chip_bytes", "hbm_bytes_per_chip",
              "fits_hbm", "compile_s", "flops_per_chip", "bytes_accessed_per_chip",
              "collective_bytes", "model_flops_per_step", "est_step_s", "est_mfu"):
    assert key in r, key
  assert r["n_chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
  b = r["per_chip_bytes"]
  # Against the analytic parameter count (model/param_count.py), fp32: sharded, a chip
  # holds at least 1/n of the weights and at most all of them.
  n_params = count_params(model_config_from(tpu_smoke.get_config().model))["total"]
  assert 4 * n_params / r["n_chips"] <= b["params"] < 4 * n_params
  # AdamW: two fp32 moments per fp32 parameter, sharded alike.
  assert b["optimizer"] == pytest.approx(2 * b["params"], rel=0.01)
  assert b["params"] + b["optimizer"] <= b["arguments"]
  assert 0 < b["total"] < r["hbm_bytes_per_chip"]
  assert set(r["collective_bytes"]) == set(aot.COLLECTIVES)
  # Expert parallelism moves tokens by all-to-all; fsdp gathers weights.
  assert r["collective_bytes"]["all-to-all"] > 0
  assert r["collective_bytes"]["all-gather"] > 0
  assert 0 < r["est_mfu"] <= 1


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
