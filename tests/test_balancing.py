"""Load balancing: the bias update rule, MaxVio, the balance losses (against numpy), the
bias's isolation from the optimizer, the global update on 8 devices, and the ablation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import balancing
from deepseek_jax.train import sharding, step as ts
from deepseek_jax.model.config import model_config_from
from deepseek_jax.model.transformer import Transformer
from deepseek_jax.model.moe import MoEStats
from train_helpers import tiny_run_config


def test_sign_update_on_hand_made_counts():
  bias = jnp.array([[0.1, 0.0, -0.2, 0.0]])
  load = jnp.array([[30.0, 10.0, 0.0, 20.0]])   # mean 15
  new = balancing.update_bias(bias, load, 1e-3, "sign")
  np.testing.assert_allclose(new, [[0.1 - 1e-3, 1e-3, -0.2 + 1e-3, -1e-3]], atol=1e-7)
  balanced = balancing.update_bias(bias, jnp.full((1, 4), 15.0), 1e-3, "sign")
  np.testing.assert_array_equal(balanced, bias)
  assert new.dtype == jnp.float32


def test_magnitude_update_and_idle_layer():
  load = jnp.array([[30.0, 10.0, 0.0, 20.0], [0.0, 0.0, 0.0, 0.0]])
  new = balancing.update_bias(jnp.zeros((2, 4)), load, 0.1, "magnitude")
  np.testing.assert_allclose(new[0], 0.1 * (15.0 - load[0]) / 15.0, rtol=1e-6)
  np.testing.assert_array_equal(new[1], 0.0)  # a layer that routed nothing is left alone
  with pytest.raises(ValueError, match="bias_rule"):
    balancing.update_bias(jnp.zeros((1, 4)), load[:1], 0.1, "sideways")


def test_maxvio_on_hand_made_loads():
  load = jnp.array([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0], [20.0, 10.0, 5.0, 5.0]])
  np.testing.assert_allclose(balancing.max_violation(load), [0.0, 3.0, 1.0], rtol=1e-6)


def _random_stats(rng, L=2, B=3, T=5, E=8, K=2):
  scores = rng.uniform(0.05, 1.0, (L, B, T, E))
  top = np.argsort(-scores, -1)[..., :K]
  counts = np.zeros((L, B, E))
  for l in range(L):
    for b in range(B):
      for t in range(T):
        for e in top[l, b, t]:
          counts[l, b, e] += 1
  return scores, counts


def _numpy_losses(scores, counts, K):
  """Each layer's loss, SUMMED over layers (SPEC 3); seq_aux averages over sequences."""
  L, B, T, E = scores.shape
  seq, batch, aux = [], [], []
  for l in range(L):
    per_seq = []
    for b in range(B):  # V3 eqs 17-20, per sequence
      f = E / (K * T) * counts[l, b]
      p = (scores[l, b] / scores[l, b].sum(-1, keepdims=True)).mean(0)
      per_seq.append((f * p).sum())
    seq.append(np.mean(per_seq))
    f = E / (K * B * T) * counts[l].sum(0)
    p_norm = (scores[l] / scores[l].sum(-1, keepdims=True)).reshape(-1, E).mean(0)
    p_raw = scores[l].reshape(-1, E).mean(0)
    batch.append((f * p_norm).sum())
    aux.append((f * p_raw).sum())
  return {"seq_aux": np.sum(seq), "batch_aux": np.sum(batch), "aux": np.sum(aux)}


def _stats(scores, counts):
  s = jnp.asarray(scores, jnp.float32)
  L, B, T, E = s.shape
  return MoEStats(load_E=jnp.asarray(counts.sum(1), jnp.float32),
                  aux_count_BE=jnp.asarray(counts, jnp.float32),
                  aux_prob_BE=(s / s.sum(-1, keepdims=True)).sum(2),
                  aux_score_BE=s.sum(2), n_tokens_B=jnp.full((L, B), float(T)),
                  dropped=jnp.zeros((L,)))


def test_balance_losses_and_gradients_against_numpy():
  rng = np.random.default_rng(0)
  scores, counts = _random_stats(rng)
  got = balancing.balance_terms(_stats(scores, counts), top_k=2)
  want = _numpy_losses(scores, counts, 2)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5)
  # Gradients w.r.t. the affinities: jax vs central differences of the numpy loss.
  for name in ("aux", "seq_aux", "batch_aux"):
    g = jax.grad(lambda s: balancing.balance_terms(_stats(s, counts), 2)[name])(
        jnp.asarray(scores, jnp.float32))
    idx = (1, 2, 3, 4)
    eps = 1e-4
    up, down = scores.copy(), scores.copy()
    up[idx] += eps
    down[idx] -= eps
    fd = (_numpy_losses(up, counts, 2)[name] - _numpy_losses(down, counts, 2)[name]) / (2 * eps)
    np.testing.assert_allclose(g[idx], fd, rtol=1e-3, atol=1e-6)


def test_balanced_routing_gives_one_per_layer():
  # Perfectly uniform counts and scores: f_i = 1, P_i = 1/E, so sum_i f_i P_i = 1 in
  # each layer, and the losses sum the layers: 3 here.
  E, K, T, L = 4, 2, 8, 3
  scores = np.full((L, 1, T, E), 0.5)
  counts = np.full((L, 1, E), T * K / E)
  got = balancing.balance_terms(_stats(scores, counts), K)
  np.testing.assert_allclose(got["seq_aux"], 3.0, rtol=1e-6)
  np.testing.assert_allclose(got["batch_aux"], 3.0, rtol=1e-6)


def _numpy_layer_losses(stats_list, K, E):
  """{loss: [per routed layer]} from the numpy model's routing stats: each layer's
  f_i (plain top-K counts) and P_i, straight from the definitions."""
  out = {"aux": [], "seq_aux": [], "batch_aux": []}
  for s in stats_list:
    n_B = s["n_tokens_B"]
    f_BE = E / K * s["aux_count_BE"] / n_B[:, None]
    out["seq_aux"].append(np.mean((f_BE * s["aux_prob_BE"] / n_B[:, None]).sum(-1)))
    f_E = E / K * s["aux_count_BE"].sum(0) / n_B.sum()
    out["batch_aux"].append((f_E * s["aux_prob_BE"].sum(0) / n_B.sum()).sum())
    out["aux"].append((f_E * s["aux_score_BE"].sum(0) / n_B.sum()).sum())
  return out


def test_losses_sum_every_routed_layer_of_a_real_forward(tmp_path):
  """The logged balance/* values are the SUM over routed layers (2 MoE layers + 2 MTP
  MoE blocks here) of each layer's loss, the layers' routing taken from the numpy
  model's forward of the same batch (not hand-built statistics)."""
  import reference_numpy as ref
  from deepseek_jax.model import config
  cfg_model = config.tiny()          # 3 layers (1 dense), MTP depth 2, E = 8 top-3
  cfg = tiny_run_config(tmp_path)
  for k, v in cfg_model.to_dict().items():
    cfg.model[k] = v
  model = Transformer(cfg_model)
  state = ts.init_state(model, ts.make_optimizer(cfg.optimizer, 10), jax.random.PRNGKey(3))
  params = jax.tree.map(jnp.asarray, ref.randomize(jax.device_get(state.params), 3))
  bias = jnp.asarray(np.random.default_rng(3).normal(0, 0.1, state.expert_bias.shape),
                     jnp.float32)
  rng = np.random.default_rng(4)
  B, T = 2, 9
  seg = np.broadcast_to(np.repeat([1, 2], [5, 4]), (B, T))
  batch = {"tokens": jnp.asarray(rng.integers(0, 97, (B, T)), jnp.int32),
           "segments": jnp.asarray(seg, jnp.int32),
           "positions": jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32)}
  hp = jax.tree.map(jnp.float32, ts.balance_hparams(cfg))
  _, (metrics, _) = jax.jit(lambda p, b: ts.forward_losses(model, p, b, batch, cfg, hp))(
      params, bias)
  stats = []
  ref.transformer(jax.device_get(params), np.asarray(bias), np.asarray(batch["tokens"])[:, :-1],
                  cfg_model, seg[:, :-1], stats)
  assert len(stats) == cfg_model.n_routed_layers == 4
  per_layer = _numpy_layer_losses(stats, cfg_model.top_k, cfg_model.n_routed_experts)
  for name, values in per_layer.items():
    assert min(values) > 0.5, (name, values)   # every layer contributes
    np.testing.assert_allclose(metrics[f"balance/{name}"], np.sum(values), rtol=2e-4,
                               err_msg=name)


def _setup(tmp_path, mesh=None, **overrides):
  cfg = tiny_run_config(tmp_path, **{"balance.bias_rate": 0.01, **overrides})
  model = Transformer(model_config_from(cfg.model))
  tx = ts.make_optimizer(cfg.optimizer, cfg.total_steps)
  state = ts.init_state(model, tx, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  B, T = cfg.batch_size, cfg.seq_len + 1
  segments = np.repeat(np.arange(1, 3), T // 2 + 1)[:T]
  batch = {"tokens": jnp.asarray(rng.integers(0, 200, (B, T)), jnp.int32),
           "segments": jnp.asarray(np.broadcast_to(segments, (B, T)), jnp.int32),
           "positions": jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32)}
  hp = jax.tree.map(jnp.float32, ts.balance_hparams(cfg))
  return cfg, model, tx, state, batch, hp


def test_bias_steers_no_gradient_and_gets_no_weight_decay(tmp_path):
  """A uniform bias per layer changes no expert choice, so it must change nothing the
  optimizer sees: the same new params as the bias-0 step (it would not if gates, balance
  losses or any gradient read s + b). And with u = 0 the bias is left exactly as it was,
  under a weight decay that would visibly shrink a parameter."""
  cfg, model, tx, state, batch, hp = _setup(tmp_path, **{"balance.bias_rate": 0.0,
                                                       "optimizer.weight_decay": 0.5})
  assert "expert_bias" not in str(jax.tree_util.tree_structure(state.params))
  step = jax.jit(lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx, cfg=cfg))
  shift_L1 = jnp.arange(1.0, state.expert_bias.shape[0] + 1)[:, None] * 0.3
  bias0 = jnp.broadcast_to(shift_L1, state.expert_bias.shape)
  new0, m0 = step(state, batch, hp)
  new, m = step(state.replace(expert_bias=bias0), batch, hp)
  np.testing.assert_array_equal(new.expert_bias, bias0)  # u = 0: untouched, not decayed
  np.testing.assert_allclose(m["loss"], m0["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               new.params, new0.params)


def _numpy_loads(params, bias_LE, batch, cfg):
  """Per-layer expert loads [L, E] of the whole global batch, from the numpy model."""
  import reference_numpy as ref
  stats = []
  segments = np.asarray(batch["segments"])[:, :-1]
  ref.transformer(jax.tree.map(np.asarray, params), np.asarray(bias_LE),
                  np.asarray(batch["tokens"])[:, :-1], model_config_from(cfg.model),
                  segments if cfg.data.doc_attention_mask else None, stats)
  return np.stack([s["load_E"] for s in stats])


def test_bias_update_uses_global_loads_on_8_devices(tmp_path):
  """Expert-parallel on a data=2 x expert=4 mesh, 2 microbatches: each shard routes 1/16 of
  the batch; the loads and the bias update must be those of the whole global batch, counted
  here by the numpy model routing every token (not by the step's own report)."""
  cfg, model, tx, state, batch, hp = _setup(tmp_path, **{"microbatches": 2, "batch_size": 16})
  bias0 = jnp.asarray(np.random.default_rng(5).normal(0, 0.05, state.expert_bias.shape),
                      jnp.float32)
  state = state.replace(expert_bias=bias0)
  from deepseek_jax.train.program import state_shardings
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  st_sh = state_shardings(model, tx, mesh)
  b_sh = sharding.batch_sharding(mesh)
  step = lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx, cfg=cfg)
  sharded_fn = sharding.with_mesh(mesh, jax.jit(step, in_shardings=(st_sh, b_sh, None),
                                                out_shardings=(st_sh, None)))
  sharded, m8 = sharded_fn(jax.device_put(state, st_sh), jax.device_put(batch, b_sh), hp)
  want_LE = _numpy_loads(state.params, bias0, batch, cfg)
  got_LE = np.asarray(m8["load"])
  assert got_LE.shape == want_LE.shape
  assert want_LE[0].sum() == cfg.batch_size * cfg.seq_len * 2  # every token, K=2
  # float64 vs float32 routing may flip a near-tie: allow a couple of assignments.
  assert np.abs(got_LE - want_LE).sum(-1).max() <= 2, (got_LE, want_LE)
  # Where the global load is clearly above or below the layer mean, the step moved the
  # bias by exactly -u or +u.
  mean_L1 = want_LE.mean(-1, keepdims=True)
  clear = np.abs(want_LE - mean_L1) > 2
  want_bias = np.asarray(bias0) + 0.01 * np.sign(mean_L1 - want_LE)
  assert clear.sum() > want_LE.size // 2
  np.testing.assert_allclose(np.asarray(sharded.expert_bias)[clear], want_bias[clear],
                             atol=1e-7)


def test_bias_update_freezes_after_fraction(tmp_path):
  cfg, model, tx, state, batch, _ = _setup(tmp_path, **{"balance.bias_freeze_frac": 0.5})
  hp = jax.tree.map(jnp.float32, ts.balance_hparams(cfg))
  assert float(ts.bias_rate(hp, jnp.int32(5))) == pytest.approx(0.01)
  assert float(ts.bias_rate(hp, jnp.int32(6))) == 0.0  # 0.5 * 12 steps


def test_multiplicative_bias_starts_neutral_and_follows_the_sign_rule(tmp_path):
  cfg, model, tx, state, batch, hp = _setup(tmp_path, **{"model.bias_mode": "mul"})
  np.testing.assert_array_equal(state.expert_bias, 1.0)  # s * 1 = s: plain top-k
  # At the neutral bias the model is the additive model at b = 0, logit for logit.
  add_model = Transformer(model_config_from(cfg.model).replace(bias_mode="add"))
  tokens = batch["tokens"][:, :-1]
  out_mul = jax.jit(model.apply)(ts.model_variables(state.params, state.expert_bias), tokens)
  out_add = jax.jit(add_model.apply)(ts.model_variables(state.params, state.expert_bias - 1.0),
                                     tokens)
  np.testing.assert_array_equal(out_mul.logits, out_add.logits)
  new, m = jax.jit(lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx, cfg=cfg))(
      state, batch, hp)
  # The loads counted by the numpy model (at b = 1, i.e. the additive model at b = 0),
  # not the step's own report: clearly over- and under-loaded experts moved by -/+ u.
  add_cfg = tiny_run_config(tmp_path, **{"model.bias_mode": "add"})
  want_LE = _numpy_loads(state.params, np.zeros(state.expert_bias.shape), batch, add_cfg)
  mean_L1 = want_LE.mean(-1, keepdims=True)
  clear = np.abs(want_LE - mean_L1) > 2
  assert clear.sum() > want_LE.size // 2
  np.testing.assert_allclose(np.asarray(new.expert_bias)[clear],
                             (1.0 + 0.01 * np.sign(mean_L1 - want_LE))[clear], atol=1e-7)
  assert float(jnp.max(jnp.abs(new.expert_bias - 1.0))) == pytest.approx(0.01)


def test_hf_export_refuses_a_multiplicative_bias():
  from deepseek_jax import hf
  from deepseek_jax.model import config
  with pytest.raises(ValueError, match="bias_mode"):
    hf.config_to_hf(config.tiny().replace(bias_mode="mul"))


def _small_corpus():
  import sysconfig
  root = sysconfig.get_paths()["stdlib"]
  return f"{root}/json/*.py,{root}/email/*.py,{root}/collections/*.py"


def test_ablation_end_to_end_at_tiny_size(tmp_path):
  """Two strategies trained at once in two spawned processes (the main job's default;
  the Pareto test below runs its jobs one after the other in this process)."""
  from configs import small
  from deepseek_jax.ablation import runner as ablation
  runs = ablation.plan(["aux", "bias"], None)
  results = ablation.run(small.get_config, runs, str(tmp_path / "abl"), size="tiny", steps=6,
                         seeds=(1,), peak_flops=1e11,
                         overrides={"data.cache_dir": str(tmp_path / "cache"), "mesh.data": -1,
                                    "data.source": "files", "data.paths": _small_corpus(),
                                    "data.val_fraction": 0.25, "eval_batches": 1,
                                    "final_eval_batches": 2}, parallel=2)
  for name in ("aux", "bias"):   # each lane's console, ending with its final evaluation
    assert "eval at step 6" in (tmp_path / "abl" / name / "console.log").read_text()
  with open(tmp_path / "abl" / "results.json") as fh:
    saved = json.load(fh)["runs"]
  assert set(saved) == {"aux", "bias"}
  for r in saved.values():
    for k in ("val_loss", "val_ppl", "maxvio_global", "maxvio_batch", "dropped_frac",
              "tokens_per_s"):
      assert np.isfinite(r[k]), k
  assert saved["aux"]["balance"]["aux_alpha"] == 1e-3
  assert saved["bias"]["balance"]["bias_rate"] == 1e-3
  for f in ("report.md", "val_loss.png", "maxvio_batch.png", "load_aux.png", "load_bias.png"):
    assert os.path.getsize(tmp_path / "abl" / f) > 0, f
  report_md = (tmp_path / "abl" / "report.md").read_text()
  assert "| bias |" in report_md
  from deepseek_jax import balancing
  assert f"- **bias**: {balancing.STRATEGIES['bias'].definition}." in report_md
  assert "Pareto" not in report_md    # one alpha and one rate make no sweep
  assert results["bias"]["steps"] == 6
  # The report rebuilds from the saved runs alone.
  from deepseek_jax.ablation import report, saved_runs
  again = report.write_report({n: saved_runs.load_run(str(tmp_path / "abl" / n))
                               for n in ("aux", "bias")}, str(tmp_path / "again"))
  assert again["aux"]["val_loss"] == pytest.approx(saved["aux"]["val_loss"])


def test_overrides_win_over_a_runs_settings_except_what_the_sweep_varies():
  """--config.PATH=VALUE on every run, after its strategy: a field the runs share is the
  user's (even a strategy's knob, with one strategy); one they differ in is refused."""
  from configs import small
  from deepseek_jax.ablation import runner
  jobs = [(n, small.get_config(a + ",size=tiny")) for n, a in runner.plan(["aux", "bias"], None)]
  runner.apply_overrides(jobs, {"total_steps": 5, "mesh.data": 2,
                                "balance.seq_aux_alpha": 1e-4})
  for _, cfg in jobs:
    assert (cfg.total_steps, cfg.mesh.data, cfg.balance.seq_aux_alpha) == (5, 2, 1e-4)
  with pytest.raises(ValueError, match=r"^--config\.balance\.aux_alpha: the runs of this "
                     r"sweep set it to different values \(0\.0, 0\.001"):
    runner.apply_overrides(jobs, {"balance.aux_alpha": 0.01})
  one = runner.apply_overrides([("bias", small.get_config("strategy=bias,size=tiny"))],
                               {"balance.bias_rate": 1e-2})
  assert one[0][1].balance.bias_rate == 1e-2
  with pytest.raises(ValueError, match="unknown strategy 'nope'; known: none, aux"):
    runner.plan(["aux", "nope"], None)


def test_readme_defines_the_default_strategies_in_the_registrys_words():
  """The headline table's definitions (README.md) are the registry's, for every strategy
  the default ablation runs; docs/results.md's strategy table names every strategy."""
  import re
  from deepseek_jax import balancing
  from deepseek_jax.ablation import report, runner
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  readme = open(os.path.join(root, "README.md")).read().splitlines()
  for name in runner.DEFAULT_STRATEGIES:
    bullets = [l for l in readme if re.match(rf"- \*\*{name}( \([^)]*\))?\*\*: ", l)]
    assert len(bullets) == 1, f"README.md: no single definition bullet for {name}"
    assert bullets[0].split("**: ", 1)[1] == balancing.STRATEGIES[name].definition + ".", (
        f"README.md's {name} bullet differs from deepseek_jax/balancing.py STRATEGIES")
  results = open(os.path.join(root, "docs", "results.md")).read()
  assert not [n for n in balancing.STRATEGIES if f"`{n}`" not in results]
  # The report names a sweep's runs by the strategy they are.
  assert [report.strategy_of(g) for g in ("bias_magnitude_u0.01", "aux_a0.1", "bias_u0.01",
                                          "batch_aux_micro", "elsewhere")] == [
      "bias_magnitude", "aux", "bias", "batch_aux_micro", None]


def test_an_interrupted_run_stops_the_ablation(tmp_path, monkeypatch):
  """A run that saved and stopped on SIGTERM / Ctrl-C stops the ablation (it used to go
  on to the next strategy and report the stopped run as if finished)."""
  from configs import small
  from deepseek_jax.ablation import runner as ablation
  trained = []

  def fake_train(cfg, workdir, peak_flops=None):
    trained.append(os.path.basename(workdir))
    return {"step": 3, "preempted": True}
  monkeypatch.setattr(ablation.trainer, "train", fake_train)
  with pytest.raises(ablation.Interrupted, match="aux stopped at step 3"):
    ablation.run(small.get_config, ablation.plan(["aux", "bias"], None), str(tmp_path),
                 size="tiny", steps=6)
  assert trained == ["aux"]


def test_pareto_sweep_and_seeds_end_to_end_at_tiny_size(tmp_path, monkeypatch, capsys):
  """--sweep=pareto --gate=softmax --seeds=0,1 --reuse=EARLIER (a shortened sweep: two
  loss families at two alphas, one rate, quantile, none): the earlier folder's finished
  runs of the same config are copied, not retrained; every run on every seed with the
  softmax gate; the seed table, the Pareto table with intervals, the paired verdict per
  family, the plot."""
  from configs import small
  from deepseek_jax.ablation import runner as ablation
  monkeypatch.setattr(ablation, "PARETO_ALPHAS", (1e-3, 1e-1))
  monkeypatch.setattr(ablation, "PARETO_LOSSES", ("aux", "seq_aux"))
  monkeypatch.setattr(ablation, "RATE_SWEEP", (1e-2,))
  runs = ablation.plan([], "pareto")
  assert [n for n, _ in runs] == ["none", "aux_a0.001", "aux_a0.1", "seq_aux_a0.001",
                                  "seq_aux_a0.1", "bias_u0.01", "quantile"]
  kw = dict(size="tiny", steps=3, seeds=(0, 1), peak_flops=1e11, gate="softmax",
            overrides={"data.cache_dir": str(tmp_path / "cache"), "mesh.data": -1,
                       "data.source": "files", "data.paths": _small_corpus(),
                       "data.val_fraction": 0.25, "eval_batches": 1,
                       "final_eval_batches": 1})
  earlier = tmp_path / "earlier"      # e.g. the main job: one seed, runs named by strategy
  ablation.run(small.get_config, ablation.plan(["none"], None), str(earlier),
               **dict(kw, seeds=(0,)))
  trained = []
  real_train = ablation.trainer.train
  monkeypatch.setattr(ablation.trainer, "train", lambda cfg, wd, **k: (
      trained.append((os.path.basename(wd), os.path.exists(os.path.join(wd, "config.json")))),
      real_train(cfg, wd, **k))[1])
  out = tmp_path / "pareto"
  ablation.run(small.get_config, runs, str(out), reuse=[str(earlier)], **kw)
  assert "none_seed0: reusing" in capsys.readouterr().out
  # The copies arrive finished (their config.json already there): resumed at the end.
  assert [n for n, existed in trained if existed] == ["none_seed0"]
  assert (out / "none_seed0" / "metrics.jsonl").read_text() == (
      earlier / "none" / "metrics.jsonl").read_text()
  saved = json.loads((out / "results.json").read_text())
  assert set(saved["runs"]) == {f"{n}_seed{s}" for n, _ in runs for s in (0, 1)}
  assert saved["runs"]["aux_a0.1_seed1"]["balance"]["aux_alpha"] == 0.1
  assert saved["runs"]["seq_aux_a0.1_seed0"]["balance"]["seq_aux_alpha"] == 0.1
  assert saved["runs"]["bias_u0.01_seed0"]["seed"] == 0
  cfg = json.loads((out / "seq_aux_a0.1_seed0" / "config.json").read_text())
  assert cfg["model"]["score_func"] == "softmax"
  assert saved["seeds"]["aux_a0.1"]["val_loss"]["n"] == 2
  assert np.isfinite(saved["seeds"]["aux_a0.1"]["val_loss"]["ci95"])
  assert {p["family"] for p in saved["pareto"]} == {"none", "aux", "seq_aux", "bias",
                                                     "quantile"}
  assert set(saved["matched"]) == {"aux", "seq_aux"}
  report_md = (out / "report.md").read_text()
  assert "Over seeds" in report_md and "± " in report_md
  assert "Pareto frontier" in report_md and "| aux_a0.1 | aux | 0.1 |" in report_md
  assert "Aux loss from alpha 0.001 to 0.1" in report_md
  assert "- **seq_aux**:" in report_md and "The bias (bias_u0.01) sits" in report_md
  assert (out / "pareto.png").stat().st_size > 0


def _summary(loss, vio, alpha=0.0, rate=0.0, seed=0, loss_name="aux_alpha", rule="sign"):
  balance = {"aux_alpha": 0.0, "bias_rate": rate, "seq_aux_alpha": 0.0,
             "batch_aux_alpha": 0.0, "bias_rule": rule}
  balance[loss_name] = alpha
  return {"val_loss": loss, "maxvio_global": vio, "seed": seed, "balance": balance}


def test_pareto_families_intervals_and_matched_pairs_against_hand_values():
  """Three seeds, every family: the points' means and t-intervals, dominance on the
  means with the overlapping ones marked, each loss family's trade-off and the bias
  against its matched point as paired intervals, and the words they give, all against
  values computed here by hand."""
  from deepseek_jax.ablation import pareto, saved_runs, verdicts
  runs = {}
  table = {  # name: (losses, MaxVios over seeds 0-2, summary kwargs)
      "none": ([3.99, 3.98, 4.00], [7.0, 7.2, 7.1], {}),
      "aux_a0.001": ([4.00, 4.01, 4.02], [3.0, 3.1, 3.2], dict(alpha=1e-3)),
      "aux_a0.1": ([4.30, 4.32, 4.34], [2.0, 2.1, 2.2], dict(alpha=0.1)),
      "batch_aux_a0.001": ([3.99, 4.00, 4.01], [1.0, 1.2, 1.1],
                           dict(alpha=1e-3, loss_name="batch_aux_alpha")),
      "batch_aux_a0.1": ([4.05, 4.03, 4.10], [0.3, 0.4, 0.35],
                         dict(alpha=0.1, loss_name="batch_aux_alpha")),
      "bias_u0.001": ([3.98, 4.00, 3.99], [0.40, 0.45, 0.35], dict(rate=1e-3)),
      "quantile": ([3.995, 4.0, 3.99], [0.6, 0.5, 0.7], dict(rate=1.0, rule="quantile")),
  }
  for name, (losses, vios, kw) in table.items():
    for seed in range(3):
      runs[f"{name}_seed{seed}"] = _summary(losses[seed], vios[seed], seed=seed, **kw)
  groups = saved_runs.group_by_strategy(runs)
  pts = {p["name"]: p for p in pareto.pareto_points(groups)}
  t2 = 4.303  # t quantile, 2 degrees of freedom
  half = lambda v: t2 * np.std(v, ddof=1) / np.sqrt(3)
  assert (pts["batch_aux_a0.1"]["family"], pts["batch_aux_a0.1"]["knob"]) == ("batch_aux", 0.1)
  assert pts["quantile"]["family"] == "quantile" and pts["none"]["family"] == "none"
  np.testing.assert_allclose(pts["batch_aux_a0.1"]["val_loss"], 4.06)
  np.testing.assert_allclose(pts["batch_aux_a0.1"]["val_loss_ci95"], half([4.05, 4.03, 4.10]),
                             rtol=1e-3)
  np.testing.assert_allclose(pts["aux_a0.1"]["maxvio_global_ci95"], half([2.0, 2.1, 2.2]),
                             rtol=1e-3)
  # Means: bias (3.99, 0.40) dominates none (3.99, 7.1), aux_a0.001 (4.01, 3.1) and
  # batch_aux_a0.001 (4.00, 1.1); batch_aux_a0.1 (4.06, 0.35) is on the frontier.
  assert {"bias_u0.001", "batch_aux_a0.001"} <= set(pts["aux_a0.001"]["dominated_by"])
  assert pts["batch_aux_a0.1"]["dominated_by"] == [] and pts["bias_u0.001"]["dominated_by"] == []
  # quantile (3.995, 0.6) against the bias: losses overlap (|0.005| < 0.0248 + 0.0124) and
  # MaxVios overlap (|0.2| < 0.248 + 0.124): dominated, not resolved.
  assert pts["quantile"]["dominated_by"] == ["bias_u0.001"]
  assert pts["quantile"]["within_noise"] == ["bias_u0.001"]
  # batch_aux_a0.001's MaxVio (1.1 +- 0.248) is clear of the bias's (0.40 +- 0.124).
  assert "bias_u0.001" not in pts["batch_aux_a0.001"]["within_noise"]

  comp = pareto.matched_comparisons(groups, list(pts.values()))
  # batch_aux reaches the bias's balance (0.35 <= 0.40): paired bias - batch_aux_a0.1.
  b = comp["batch_aux"]
  assert (b["bias"], b["match"], b["reaches"]) == ("bias_u0.001", "batch_aux_a0.1", True)
  d = np.array([3.98, 4.00, 3.99]) - np.array([4.05, 4.03, 4.10])
  np.testing.assert_allclose(b["val_loss"]["mean"], d.mean())
  np.testing.assert_allclose(b["val_loss"]["ci95"], half(d), rtol=1e-3)
  # Its own trade-off, a0.001 -> a0.1: MaxVio -0.75 (resolved), loss +0.06 +- 0.0745.
  np.testing.assert_allclose(b["trade"]["maxvio_global"]["mean"], -0.75)
  np.testing.assert_allclose(b["trade"]["val_loss"]["ci95"], half([0.06, 0.03, 0.09]),
                             rtol=1e-3)
  # aux never reaches 0.40: matched with its best-balanced point, aux_a0.1.
  a = comp["aux"]
  assert (a["match"], a["reaches"]) == ("aux_a0.1", False)
  np.testing.assert_allclose(a["val_loss"]["mean"], np.mean([-0.32, -0.32, -0.35]))
  words = "\n".join(verdicts.dilemma_verdict(comp))
  aux_line = next(l for l in words.splitlines() if l.startswith("- **aux**"))
  batch_line = next(l for l in words.splitlines() if l.startswith("- **batch_aux**"))
  assert "shows the dilemma" in aux_line and "sits below the family's curve" in aux_line
  assert "does not reach its balance" in aux_line
  assert "balance improves at no resolved loss cost" in batch_line
  assert "sits inside the noise of the family's curve" in batch_line
  # One seed gives no verdict, never a verdict from means.
  one = saved_runs.group_by_strategy({n: r for n, r in runs.items() if n.endswith("_seed0")})
  one_pts = pareto.pareto_points(one)
  assert all(p["within_noise"] == [] for p in one_pts)
  assert all("no verdict" in l for l in verdicts.dilemma_verdict(
      pareto.matched_comparisons(one, one_pts)))


def test_pareto_points_mark_the_dominated_runs():
  from deepseek_jax.ablation import pareto, saved_runs, verdicts
  groups = saved_runs.group_by_strategy({
      "none": _summary(3.99, 2.2), "aux_a0.001": _summary(3.98, 1.8, alpha=1e-3),
      "aux_a0.1": _summary(4.05, 0.5, alpha=0.1), "bias_u0.001": _summary(3.97, 0.2, rate=1e-3),
      "bias_u0.01": _summary(4.00, 0.1, rate=1e-2)})
  pts = {p["name"]: p for p in pareto.pareto_points(groups)}
  assert set(pts["aux_a0.1"]["dominated_by"]) == {"bias_u0.001", "bias_u0.01"}
  assert set(pts["none"]["dominated_by"]) == {"aux_a0.001", "bias_u0.001"}
  assert pts["bias_u0.01"]["dominated_by"] == [] and pts["bias_u0.001"]["dominated_by"] == []
  words = " ".join(verdicts.pareto_verdict(list(pts.values())))
  assert "bias_u0.001, bias_u0.01" in words
  assert "Aux runs dominated by a bias run: 2 of 2" in words
  assert "No aux alpha reaches the bias's best balance" in words


def test_seeded_verdict_is_worded_from_the_interval():
  from deepseek_jax.ablation import saved_runs, stats, verdicts
  runs = {}
  for s, (a, b) in enumerate([(3.98, 3.99), (3.97, 3.985), (3.99, 4.0)]):
    runs[f"aux_seed{s}"] = _summary(a, 1.8, alpha=1e-3, seed=s)
    runs[f"bias_seed{s}"] = _summary(b, 0.2, rate=1e-3, seed=s)
    runs[f"none_seed{s}"] = _summary(a + (0.01 if s == 0 else -0.01), 2.0, seed=s)
  groups = saved_runs.group_by_strategy(runs)
  lines = verdicts.seeded_verdict(groups)
  bias = next(l for l in lines if l.startswith("- **bias"))
  none = next(l for l in lines if l.startswith("- **none"))
  assert "validation loss is higher" in bias and "MaxVio_global is lower" in bias
  assert "validation loss is indistinguishable" in none
  iv = stats.paired(groups, "aux", "bias", "val_loss")
  np.testing.assert_allclose(iv["mean"], np.mean([0.01, 0.015, 0.01]))
  np.testing.assert_allclose(iv["ci95"], 4.303 * np.std([0.01, 0.015, 0.01], ddof=1)
                             / np.sqrt(3))


def test_report_verdict_never_hides_a_loss_gap():
  from deepseek_jax.ablation import verdicts
  aux = {"maxvio_global": 1.0, "val_loss": 3.982}
  say = lambda bias_loss, bias_vio=0.2: verdicts.verdict(
      {"aux": aux, "bias": {"maxvio_global": bias_vio, "val_loss": bias_loss}})[1]
  assert "agrees with the paper" in say(3.980)
  small = say(3.985)
  assert "+0.0030 nats" in small and "agrees" not in small
  assert "does NOT reproduce" in say(4.0)
  assert "does NOT reproduce" in say(3.980, bias_vio=1.5)


# Quantile Balancing -------------------------------------------------------------------

def _skewed_scores(rng, X=512, E=16):
  """Sigmoid affinities with a planted imbalance: expert j's logits shifted by 2 - 3j/E."""
  logits = rng.normal(0, 0.7, (X, E)) + np.linspace(2.0, -1.0, E)
  return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def _loads(scores, bias, K):
  idx = np.argsort(-(scores + bias), axis=1)[:, :K]
  return np.bincount(idx.ravel(), minlength=scores.shape[1]).astype(np.float64)


def test_quantile_target_matches_numpy():
  import reference_numpy as ref
  from deepseek_jax.model import moe
  rng = np.random.default_rng(0)
  scores = _skewed_scores(rng, X=96, E=8)
  bias = rng.normal(0, 0.05, 8).astype(np.float32)
  valid = rng.uniform(size=96) > 0.2
  for K in (1, 2, 3):
    got = moe.quantile_bias_target(jnp.asarray(scores), jnp.asarray(bias), jnp.asarray(valid),
                                   K)
    np.testing.assert_allclose(got, ref.quantile_target(scores, bias, valid, K), atol=1e-6,
                               err_msg=f"K={K}")
    assert abs(float(jnp.mean(got))) < 1e-6


def test_quantile_balancing_moves_loads_to_the_mean_on_a_planted_imbalance():
  """Iterated on one skewed batch, the QB target balances it within a few updates,
  where the sign rule at u = 1e-3 has barely moved."""
  rng = np.random.default_rng(1)
  scores, K = _skewed_scores(rng), 2
  valid = jnp.ones((scores.shape[0],), bool)
  mv = lambda b: float(balancing.max_violation(jnp.asarray(_loads(scores, b, K))[None])[0])
  from deepseek_jax.model import moe
  bias_q = jnp.zeros((1, 16))
  bias_s = jnp.zeros((1, 16))
  start = mv(np.zeros(16))
  for _ in range(8):
    target = moe.quantile_bias_target(jnp.asarray(scores), bias_q[0], valid, K)[None]
    bias_q = balancing.update_bias(bias_q, jnp.asarray(_loads(scores, bias_q[0], K))[None],
                                   1.0, "quantile", target)
    bias_s = balancing.update_bias(bias_s, jnp.asarray(_loads(scores, bias_s[0], K))[None],
                                   1e-3, "sign")
  assert start > 2.0
  assert mv(np.asarray(bias_q[0])) < 0.25 * start and mv(np.asarray(bias_q[0])) < 0.5
  assert mv(np.asarray(bias_s[0])) > 0.8 * start
  np.testing.assert_allclose(float(jnp.mean(bias_q)), 0.0, atol=1e-6)   # centred


def test_quantile_update_rate_and_idle_layer():
  bias = jnp.array([[0.3, -0.1, -0.2], [0.5, 0.0, -0.5]])
  target = jnp.array([[0.0, 0.1, -0.1], [1.0, 1.0, -2.0]])
  load = jnp.array([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])   # layer 1 routed nothing
  half = balancing.update_bias(bias, load, 0.5, "quantile", target)
  want = 0.5 * (bias[0] + target[0])
  np.testing.assert_allclose(half[0], want - want.mean(), atol=1e-7)
  np.testing.assert_array_equal(half[1], bias[1])
  np.testing.assert_array_equal(balancing.update_bias(bias, load, 0.0, "quantile", target)[0],
                                bias[0] - bias[0].mean())
  with pytest.raises(ValueError, match="quantile_stats"):
    balancing.update_bias(bias, load, 1.0, "quantile")


def test_quantile_strategy_sets_the_bias_to_the_steps_target(tmp_path):
  """The train step with QB (u = 1) sets each routed layer's bias to the centred target
  of the batch it routed, here computed from the numpy model's affinities of that batch
  by the numpy QB rule (reference_numpy.quantile_target), not by the model's own stats."""
  import reference_numpy as ref
  cfg, model, tx, state, batch, hp = _setup(
      tmp_path, **{"balance.bias_rule": "quantile", "balance.bias_rate": 1.0,
                   "model.quantile_stats": True,
                   "model.n_group": 1, "model.topk_group": 1})   # QB: plain top-K
  bias0 = jnp.asarray(np.random.default_rng(6).normal(0, 0.02, state.expert_bias.shape),
                      jnp.float32)
  state = state.replace(expert_bias=bias0)
  new, m = jax.jit(lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx, cfg=cfg))(
      state, batch, hp)
  stats = []
  ref.transformer(jax.tree.map(np.asarray, state.params), np.asarray(bias0),
                  np.asarray(batch["tokens"])[:, :-1], model_config_from(cfg.model),
                  np.asarray(batch["segments"])[:, :-1], stats)
  K = cfg.model.top_k
  want = np.stack([ref.quantile_target(s["scores_XE"], np.asarray(b), s["valid_X"], K)
                   for s, b in zip(stats, bias0)])
  np.testing.assert_allclose(new.expert_bias, want, atol=2e-5)
  assert float(jnp.abs(new.expert_bias).max()) > 1e-3
  np.testing.assert_allclose(jnp.mean(new.expert_bias, -1), 0.0, atol=1e-6)


def test_quantile_strategy_needs_the_model_stats(tmp_path):
  from deepseek_jax.train import program
  cfg = tiny_run_config(tmp_path, **{"balance.bias_rule": "quantile"})
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with pytest.raises(ValueError, match="quantile_stats"):
    program.validate_run_config(cfg, mesh)


# Counting scope under gradient accumulation ---------------------------------------------

def test_global_counting_with_microbatches_equals_one_batch(tmp_path):
  """balance.count_scope="global": with 2 microbatches the batch-level loss takes f_i from
  the whole step, so loss and gradients equal the 1-microbatch step's; "micro" counts each
  microbatch alone and differs."""
  over = {"balance.batch_aux_alpha": 1.0, "balance.aux_alpha": 1.0, "balance.bias_rate": 0.0,
          "batch_size": 8}
  results = {}
  for name, extra in {"one": {"microbatches": 1},
                      "global": {"microbatches": 2},
                      "micro": {"microbatches": 2, "balance.count_scope": "micro"}}.items():
    cfg, model, tx, state, batch, hp = _setup(tmp_path / name, **over, **extra)
    results[name] = jax.jit(lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx,
                                                          cfg=cfg))(state, batch, hp)
  (one, m1), (glob, mg), (micro, mm) = results["one"], results["global"], results["micro"]
  for key in ("balance/aux", "balance/batch_aux"):
    np.testing.assert_allclose(mg[key], m1[key], rtol=1e-5, err_msg=key)
    assert abs(float(mm[key]) - float(m1[key])) > 1e-4, key
  np.testing.assert_allclose(mg["grad_norm"], m1["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(glob.params["layer_1"]["moe"]["w_router"],
                             one.params["layer_1"]["moe"]["w_router"], rtol=1e-4, atol=1e-7)


def test_dropped_frac_is_dropped_over_routed_assignments(tmp_path):
  """Capacity dispatch with one slot per expert: each expert that is chosen at all keeps
  exactly one assignment, so the dropped fraction is 1 - (experts used) / (assignments),
  near 1 here. The load counts every routed assignment (dropped ones included), so
  dividing by load + dropped (the old metric) could never exceed 1/2."""
  cfg, model, tx, state, batch, hp = _setup(
      tmp_path, **{"model.moe_dispatch": "capacity", "model.capacity_factor": 1e-6})
  _, m = jax.jit(lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx, cfg=cfg))(
      state, batch, hp)
  load_LE = np.asarray(m["load"])
  # The denominator counted by hand: each routed position sends top_k assignments. The
  # main MoE layer routes all T positions of every row; the depth-1 MTP module only the
  # positions whose next token is in the row and in the same document (_setup packs two
  # documents per row): T - 2.
  B, T, K = cfg.batch_size, cfg.seq_len, cfg.model.top_k
  routed_L = np.array([B * T * K, B * (T - 2) * K])
  np.testing.assert_array_equal(load_LE.sum(-1), routed_L)
  kept = (load_LE > 0).sum()            # one slot per expert
  want = 1.0 - kept / routed_L.sum()
  assert want > 0.9
  np.testing.assert_allclose(float(m["dropped_frac"]), want, rtol=1e-6)


def test_micro_counting_updates_the_bias_after_every_microbatch(tmp_path):
  """count_scope="micro" with 2 microbatches (learning rate 0, so only the bias moves)
  equals two one-microbatch steps in a row: microbatch 0 (rows 0, 2, 4, 6: strided)
  routed with the start bias moves it, then microbatch 1 is routed with the moved bias
  and moves it again. Counting one microbatch twice, or both at once, gives another
  bias."""
  over = {"balance.count_scope": "micro", "optimizer.peak_lr": 0.0}
  cfg, model, tx, state, batch, hp = _setup(tmp_path / "two", microbatches=2, **over)
  step = lambda cfg, model, tx: jax.jit(
      lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx, cfg=cfg))
  new, _ = step(cfg, model, tx)(state, batch, hp)
  B = cfg.batch_size
  cfg1, model1, tx1, state1, _, hp1 = _setup(tmp_path / "one", microbatches=1,
                                             batch_size=B // 2, **over)
  one = step(cfg1, model1, tx1)
  halves = [{k: v[m::2] for k, v in batch.items()} for m in (0, 1)]
  after0, _ = one(state1, halves[0], hp1)
  after1, _ = one(after0, halves[1], hp1)
  twice0, _ = one(after0, halves[0], hp1)
  jax.tree.map(np.testing.assert_array_equal, after1.params, state.params)   # lr 0
  np.testing.assert_allclose(new.expert_bias, after1.expert_bias, atol=1e-7)
  assert float(jnp.abs(new.expert_bias - twice0.expert_bias).max()) > 1e-3
  # Two sign steps of u = 0.01: a bias can move by 0.02 (global counting: at most 0.01).
  assert float(jnp.abs(new.expert_bias).max()) == pytest.approx(0.02)
  # Global counting on the same batch: one update from both microbatches' loads.
  cfg_g, model_g, tx_g, state_g, batch_g, hp_g = _setup(
      tmp_path / "global", microbatches=2, **{"optimizer.peak_lr": 0.0})
  np.testing.assert_array_equal(batch_g["tokens"], batch["tokens"])
  glob, _ = step(cfg_g, model_g, tx_g)(state_g, batch_g, hp_g)
  assert float(jnp.abs(glob.expert_bias).max()) == pytest.approx(0.01)
  assert float(jnp.abs(new.expert_bias - glob.expert_bias).max()) > 1e-3


def test_mtp_lambda_switches_at_the_configured_step(tmp_path):
  cfg = tiny_run_config(tmp_path, **{"mtp_lambda_switch_step": 5})
  hp = jax.tree.map(jnp.float32, ts.balance_hparams(cfg))
  assert float(ts.mtp_lambda(hp, jnp.int32(4))) == pytest.approx(0.3)
  assert float(ts.mtp_lambda(hp, jnp.int32(5))) == pytest.approx(0.1)
  never = jax.tree.map(jnp.float32, ts.balance_hparams(tiny_run_config(tmp_path)))
  assert float(ts.mtp_lambda(never, jnp.int32(10 ** 6))) == pytest.approx(0.3)


def test_a_non_finite_step_is_skipped_not_applied(tmp_path):
  """A step whose loss is NaN (here a NaN aux weight: only the MoE router's gradients
  turn NaN) changes no parameter, optimizer moment or bias; the step counter moves on;
  the metrics say it was skipped and which parameter groups had non-finite gradients."""
  cfg, model, tx, state, batch, hp = _setup(tmp_path, **{"balance.aux_alpha": 1e-3})
  step = jax.jit(lambda s, b, h: ts.train_step(s, b, h, model=model, tx=tx, cfg=cfg))
  good, m = step(state, batch, hp)
  assert float(m["skipped"]) == 0.0 and bool(np.all(m["grad_finite"]))
  bad, m = step(state, batch, {**hp, "aux_alpha": jnp.float32(np.nan)})
  assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
  assert int(bad.step) == int(state.step) + 1
  for new, old in ((bad.params, state.params), (bad.opt_state, state.opt_state),
                   (bad.expert_bias, state.expert_bias)):
    jax.tree.map(np.testing.assert_array_equal, new, old)
  # The NaN enters through the routers' scores: everything upstream of a router (the
  # MoE layer, the layers below it, the embedding) gets a NaN gradient; the output head
  # and final norm, downstream of every router, stay finite.
  finite = dict(zip(sorted(state.params), np.asarray(m["grad_finite"])))
  assert not finite["layer_1"] and not finite["embed"], finite
  assert finite["head"] and finite["final_norm"], finite
  # The good step did move them.
  assert not np.array_equal(good.expert_bias, state.expert_bias)


def test_a_run_is_reused_by_its_numbers_not_its_logging_or_loader():
  from configs import small
  from deepseek_jax.ablation import runner as ablation
  a = small.get_config("strategy=aux,size=tiny").to_dict()
  b = small.get_config("strategy=aux,alpha=0.001,size=tiny,gate=sigmoid").to_dict()
  assert ablation.config_key(a) == ablation.config_key(b)
  b["log_every"], b["data"]["prefetch"] = 1, 0
  del b["data"]["loader_threads"]          # a run recorded before the field existed
  b["model"]["aux_group_limited"] = False   # or while a removed one did
  assert ablation.config_key(a) == ablation.config_key(b)
  for path, value in (("seed", 1), ("model.score_func", "softmax"),
                      ("balance.aux_alpha", 0.01)):
    c = small.get_config("strategy=aux,size=tiny").to_dict()
    section, _, name = path.rpartition(".")
    (c[section] if section else c)[name] = value
    assert ablation.config_key(c) != ablation.config_key(a), path
  with pytest.raises(ValueError, match="alpha= applies to"):
    small.get_config("strategy=bias,alpha=0.1")
  with pytest.raises(ValueError, match="unknown gate"):
    small.get_config("gate=relu")


def test_every_balancing_term_names_the_scope_it_counts_over():
  """seq_aux counts per sequence; the batch losses and the bias per micro-batch or per
  step as count_scope says, which with one micro-batch a step is the same: global."""
  from deepseek_jax import balancing
  from ml_collections import ConfigDict
  b = ConfigDict(dict(aux_alpha=0.0, batch_aux_alpha=1e-3, seq_aux_alpha=1e-4,
                      bias_rate=1e-3, bias_rule="quantile", count_scope="micro"))
  assert balancing.term_scopes(b, 4) == {"batch_aux": "micro", "seq_aux": "sequence",
                                         "bias_quantile": "micro"}
  assert balancing.term_scopes(b, 1) == {"batch_aux": "global", "seq_aux": "sequence",
                                         "bias_quantile": "global"}
  b.count_scope, b.bias_rate, b.seq_aux_alpha = "global", 0.0, 0.0
  assert balancing.term_scopes(b, 4) == {"batch_aux": "global"}


def test_lfb_softmax_sweep_plans_the_papers_softmax_setting():
  """--sweep=lfb_softmax: the magnitude-rule bias at every rate and the classic aux loss
  at 3e-4 and around it; the report files the magnitude bias with the bias family."""
  from configs import small
  from deepseek_jax.ablation import pareto, runner
  runs = dict(runner.plan([], "lfb_softmax"))
  assert set(runs) == {"aux_a0.0001", "aux_a0.0003", "aux_a0.001", "bias_magnitude_u0.0001",
                       "bias_magnitude_u0.001", "bias_magnitude_u0.01"}
  cfg = small.get_config(runs["bias_magnitude_u0.001"] + ",size=tiny,gate=softmax")
  assert cfg.balance.bias_rule == "magnitude" and cfg.model.score_func == "softmax"
  assert pareto.family(cfg.balance.to_dict()) == ("bias", 1e-3)
  aux = small.get_config(runs["aux_a0.0003"] + ",size=tiny").balance.to_dict()
  assert pareto.family(aux) == ("aux", 3e-4)
