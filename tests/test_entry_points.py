"""The entry points' console and their errors on missing input."""

import logging
import os
import subprocess
import sys

import pytest

from train_helpers import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(path, level):
  return logging.LogRecord("absl", level, path, 1, "msg", (), None)


def test_console_filter_keeps_project_lines_and_warnings():
  from experiments import launch
  f = launch._ProjectLines()
  ours = os.path.join(REPO, "deepseek_jax", "train", "loop.py")
  orbax = os.path.join(sys.prefix, "lib", "site-packages", "orbax", "checkpoint", "x.py")
  assert f.filter(_record(ours, logging.INFO))
  assert not f.filter(_record(orbax, logging.INFO))
  assert f.filter(_record(orbax, logging.WARNING))
  # A sibling folder whose name starts like ours is not ours.
  assert not f.filter(_record(os.path.join(REPO, "deepseek_jax_old", "x.py"), logging.INFO))


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], env=subprocess_env(),
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("make", [False, True])
def test_generate_without_a_run_names_the_problem(tmp_path, make):
  workdir = tmp_path / "nothing"
  if make:
    workdir.mkdir()
  r = _run("experiments.generate", f"--workdir={workdir}", "--prompt=x")
  assert r.returncode != 0
  assert f"no training run in {workdir}" in r.stderr
  assert "--hf_dir" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("n", [0, -3])
def test_generate_refuses_a_non_positive_token_count(tmp_path, n):
  r = _run("experiments.generate", f"--workdir={tmp_path}", "--prompt=x",
           f"--max_new_tokens={n}")
  assert r.returncode != 0 and f"--max_new_tokens must be >= 1; got {n}" in r.stderr
  assert "Traceback" not in r.stderr


def test_generate_without_a_hf_checkpoint_names_the_problem(tmp_path):
  r = _run("experiments.generate", f"--hf_dir={tmp_path}", "--prompt_ids=1,2")
  assert r.returncode != 0
  assert f"no Hugging Face checkpoint in {tmp_path}" in r.stderr
  assert "Traceback" not in r.stderr


def test_report_on_a_missing_directory_names_it(tmp_path):
  r = _run("experiments.report", f"--workdirs={tmp_path / 'gone'}")
  assert r.returncode != 0 and "is not a directory" in r.stderr
  r = _run("experiments.report", f"--workdirs={tmp_path}")
  assert r.returncode != 0 and "no run (a folder with metrics.jsonl)" in r.stderr


def test_an_unknown_config_field_is_named_with_the_nearest(tmp_path):
  """A mistyped override in a top-level section, through an entry point that only reads
  its config (no training): one line, the nearest field, exit status 2."""
  r = subprocess.run([sys.executable, "-m", "experiments.schedule",
                      "--config=configs/smoke.py", "--config.optimzer.peak_lr=1"],
                     env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "--config.optimzer.peak_lr: the config has no section 'optimzer'" in r.stderr
  assert "nearest: --config.optimizer.peak_lr" in r.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=0", "config.batch_size must be positive (got 0)"),
    ("--config.optimizer.peak_lr=-1", "config.optimizer.peak_lr must be positive (got -1.0)"),
    ("--config.mesh.data=3", "mesh: data*fsdp*expert*context*tensor = 3*1*1*1*1 = 3, but there are 1"),
    ("--config.batch_size=abc", "--config.batch_size"),
])
def test_a_users_mistake_is_one_line_and_status_2(tmp_path, override, message):
  """Config values, the mesh, a flag's type: named in one line, exit status 2, no
  traceback (they came after a 20-line traceback, status 1) and nothing written."""
  r = _run("experiments.train", "--config=configs/smoke.py", f"--workdir={tmp_path / 'w'}",
           override)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert message in r.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("args, message", [
    (["--config.mesh.dta=8"], "--config.mesh.dta: section 'mesh' has no field 'dta' "
     "(configs/small.py); nearest: --config.mesh.data"),
    (["--config.total_steps=abc"], "--config.total_steps=abc: invalid literal for int()"),
    (["--config.balance.aux_alpha=0.01"], "--config.balance.aux_alpha: the runs of this sweep "
     "set it to different values (0.0, 0.001"),
    (["--config=configs/gpu_1b.py"], "builds its runs from configs/small.py; give fields to "
     "change as --config.PATH=VALUE"),
    (["--strategies=aux,nope"], "unknown strategy 'nope'; known: none, aux"),
])
def test_an_ablation_mistake_is_one_line_and_status_2(tmp_path, args, message):
  """The ablation's --config.PATH=VALUE overrides (as experiments.train takes them) and
  its strategies: a mistake is one line, status 2, nothing written."""
  r = _run("experiments.balancing_ablation", f"--workdir={tmp_path / 'w'}", *args)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert message in r.stderr
  assert not os.path.exists(tmp_path / "w")
