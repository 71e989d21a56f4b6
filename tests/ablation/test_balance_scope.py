"""The balance-scope sweep: its cells and configs, how validation sequences are grouped
into micro-batches, and verdicts worded from paired intervals."""

import numpy as np
import pytest

from deepseek_jax.ablation import balance_scope as bs
from deepseek_jax.ablation import balance_scope_report as rep


def test_the_full_sweep_plans_every_cell_once_and_configs_follow_the_cell():
  cells = bs.plan(bs.STRATEGIES)
  # 3 scoped strategies x 2 scopes x 2 compositions + seq_aux once per composition.
  assert len(cells) == 3 * 2 * 2 + 2 and len({c["name"] for c in cells}) == len(cells)
  assert {c["scope"] for c in cells if c["strategy"] == "seq_aux"} == {"sequence"}
  cell = next(c for c in cells if c["name"] == "bias_micro_single_domain")
  cfg = bs.config_for(cell, seed=2, steps=7)
  assert (cfg.balance.count_scope, cfg.data.composition, cfg.seed, cfg.total_steps) == (
      "micro", "single_domain", 2, 7)
  assert cfg.microbatches > 1
  # Micro scope moves the bias M times a step, each by u / M: the same largest move.
  glob = bs.config_for({**cell, "scope": "global"}, seed=2, steps=7)
  assert cfg.balance.bias_rate * cfg.microbatches == pytest.approx(glob.balance.bias_rate)
  seq = bs.config_for(next(c for c in cells if c["strategy"] == "seq_aux"), 0, 7)
  assert seq.balance.seq_aux_alpha > 0 and seq.balance.count_scope == "global"
  with pytest.raises(ValueError, match="unknown strategies"):
    bs.plan(["bias", "nope"])


def test_validation_micro_batches_are_composed_as_in_training():
  domain = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
  single = bs._micro_groups(domain, "single_domain", per_micro=2)
  for g in np.unique(single):
    assert len(set(domain[single == g])) == 1 and (single == g).sum() <= 2
  mixed = bs._micro_groups(domain, "mixed", per_micro=4)
  assert np.bincount(mixed).tolist() == [4, 4, 4]
  assert max(len(set(domain[mixed == g])) for g in np.unique(mixed)) > 1


def _row(strategy, scope, composition, losses, js=(0.1, 0.1, 0.1)):
  return {"strategy": strategy, "scope": scope, "composition": composition,
          "seeds": [0, 1, 2], "val_loss": {"values": list(losses)},
          "js_divergence": {"values": list(js)}}


def test_verdicts_come_from_paired_intervals():
  """Global better by 0.05 on every seed under single_domain and no gap under mixed:
  Qwen's finding reproduces; the same gap under mixed too: it does not."""
  base = [2.00, 2.10, 1.95]
  rows = [_row("bias", "global", "single_domain", base),
          _row("bias", "micro", "single_domain", [b + 0.05 + d for b, d in
                                                  zip(base, (0.001, -0.002, 0.001))],
               js=(0.05, 0.05, 0.05)),
          _row("bias", "global", "mixed", base),
          _row("bias", "micro", "mixed", [b + d for b, d in zip(base, (0.01, -0.01, 0.0))])]
  gap = rep.paired_gap(rows, "bias", "single_domain")
  assert gap["mean"] == pytest.approx(0.05, abs=1e-3) and gap["n"] == 3
  (v,) = rep.verdicts(rows)
  assert "global scope better" in v and "no difference beyond the interval" in v
  assert "reproduces here" in v and "-0.0500 ± 0.0000 bits" in v
  rows[3] = _row("bias", "micro", "mixed", [b + 0.05 + d for b, d in
                                            zip(base, (0.001, -0.002, 0.001))])
  (v,) = rep.verdicts(rows)
  assert "does not reproduce" in v
