"""Shared pieces of the training tests: a tiny config on a small slice of the stdlib."""

import json
import os
import sysconfig

from configs import common, smoke


def tiny_run_config(tmp_path, **overrides):
  c = smoke.get_config()
  root = sysconfig.get_paths()["stdlib"]
  c.data.source = "files"
  c.data.paths = f"{root}/json/*.py,{root}/email/*.py,{root}/collections/*.py"
  c.data.val_fraction = 0.25
  c.data.cache_dir = str(tmp_path / "cache")
  c.total_steps = 12
  c.log_every = 1
  c.eval_every = 6
  c.eval_batches = 2
  c.checkpoint_every = 4
  c.seq_len = 32
  c.batch_size = 8
  c.model.d_model = 32
  c.model.ffn_dim = 64
  c.model.moe_ffn_dim = 16
  for k, v in overrides.items():
    common.set_path(c, k, v)
  return c


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return {r["step"]: r["loss"] for r in map(json.loads, fh) if "loss" in r}


def write_config_file(tmp_path, **overrides):
  """A config file for subprocess runs: tiny_run_config(tmp_path, **overrides)."""
  path = tmp_path / "run_config.py"
  here = os.path.dirname(os.path.abspath(__file__))
  path.write_text(
      "import pathlib, sys\n"
      f"sys.path.insert(0, {here!r})\n"
      "from train_helpers import tiny_run_config\n"
      "def get_config(arg=None):\n"
      f"  return tiny_run_config(pathlib.Path({str(tmp_path)!r}), **{overrides!r})\n")
  return str(path)


def subprocess_env(n_devices=1):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  # conftest's fast-compile flag, the device count of this subprocess
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n_devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  return env
