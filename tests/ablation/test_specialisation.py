"""Specialisation metrics on hand-made routings, against values worked out by hand."""

import numpy as np
import pytest

from deepseek_jax.ablation import specialisation as sp


def _routing():
  """4 sequences, 2 routed layers, 4 experts. Layer 0: domain 0 ("code", sequences 0
  and 2) uses experts 0 and 1 only, domain 1 ("prose", 1 and 3) experts 2 and 3 only.
  Layer 1: both domains spread evenly over all four."""
  load = np.zeros((4, 2, 4))
  load[0, 0] = [3, 1, 0, 0]
  load[2, 0] = [1, 3, 0, 0]
  load[1, 0] = [0, 0, 2, 2]
  load[3, 0] = [0, 0, 2, 2]
  load[:, 1] = 1.0
  return load, np.array([0, 1, 0, 1])


def test_usage_entropy_share_and_js_by_hand():
  load, domain = _routing()
  u = sp.usage(load, domain, 2)
  np.testing.assert_allclose(u[0, 0], [0.5, 0.5, 0, 0])
  np.testing.assert_allclose(u[1, 0], [0, 0, 0.5, 0.5])
  np.testing.assert_allclose(u[:, 1], 0.25)
  # Disjoint halves: JS = 1 bit; the same distribution: 0.
  np.testing.assert_allclose(sp.mean_js(u), [1.0, 0.0], atol=1e-12)
  # Two experts equally: 1 bit; four: 2 bits.
  np.testing.assert_allclose(sp.entropy(u), [[1.0, 2.0], [1.0, 2.0]], atol=1e-12)
  np.testing.assert_allclose(sp.top_k_share(u, 2), [[1.0, 0.5], [1.0, 0.5]])
  # JS([1, 0], [.5, .5]) = H([.75, .25]) - (0 + 1) / 2
  h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
  assert sp.js_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(h - 0.5)


def test_maxvio_at_micro_and_global_scope_by_hand():
  load, domain = _routing()
  # Global: layer 0 sums to [4, 4, 4, 4] -> 0; layer 1 [4, 4, 4, 4] -> 0.
  np.testing.assert_allclose(sp.maxvio(load), [0.0, 0.0], atol=1e-12)
  # One micro-batch a domain: layer 0 [4, 4, 0, 0] (max 4, mean 2) -> 1 in each.
  np.testing.assert_allclose(sp.maxvio(load, domain), [1.0, 0.0], atol=1e-12)
  # Mixed micro-batches (0, 1) and (2, 3): [3, 1, 2, 2] -> 0.5, [1, 3, 2, 2] -> 0.5.
  np.testing.assert_allclose(sp.maxvio(load, [0, 0, 1, 1]), [0.5, 0.0], atol=1e-12)
  r = sp.report(load, domain, ["code", "prose"], top_k=2, groups_B=domain)
  assert r["js_divergence"] == pytest.approx(0.5)
  assert r["maxvio_micro"] == pytest.approx(0.5) and r["maxvio_global"] == 0.0
  assert r["entropy_bits"] == {"code": 1.5, "prose": 1.5}
  assert r["top_k_share"] == {"code": 0.75, "prose": 0.75}
