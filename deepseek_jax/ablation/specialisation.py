"""Expert specialisation by domain, and MaxVio at two scopes, from routed loads.

Input: per-sequence expert loads load_BLE [B, L, E] (what the eval step returns: routed
assignments of each sequence to each expert of each routed layer) and a domain label per
sequence domain_B [B] (ints 0 .. n_domains-1). Everything is numpy on the host.

  usage        P_d[l, e]: the share of domain d's assignments in layer l that went to
               expert e (sums to 1 over e)
  js           Jensen-Shannon divergence between two domains' usage, in bits (0: the
               same experts in the same shares; 1: disjoint experts); `mean_js` averages
               it over every pair of domains, per layer
  entropy      H(P_d) per layer in bits (log2 E: every expert equally; log2 K: K
               experts only)
  top_k_share  the share of domain d's assignments taken by its K most used experts
               (K / E when spread evenly; 1 when the domain uses K experts only)
  maxvio       MaxVio (max load / mean load - 1) of loads counted over each group of
               sequences (a micro-batch) and averaged over groups, or over all of them
               (the global batch): balance at the scope the balancer counted, and beyond

Qwen's "Demons in the Detail" (arXiv 2501.11873) reads specialisation through the
first two: domains routed to different experts show as high JS divergence and low
per-domain entropy.
"""

from __future__ import annotations

import itertools

import numpy as np


def usage(load_BLE, domain_B, n_domains: int) -> np.ndarray:
  """[n_domains, L, E] per-domain expert usage, each layer's row summing to 1 (zeros for
  a domain with no sequence)."""
  load_BLE = np.asarray(load_BLE, np.float64)
  domain_B = np.asarray(domain_B)
  out = np.zeros((n_domains,) + load_BLE.shape[1:])
  for d in range(n_domains):
    total_LE = load_BLE[domain_B == d].sum(0)
    out[d] = total_LE / np.maximum(total_LE.sum(-1, keepdims=True), 1e-30)
  return out


def _entropy_bits(p):
  p = np.asarray(p, np.float64)
  logs = np.log2(np.where(p > 0, p, 1.0))
  return -(p * logs).sum(-1)


def js_divergence(p, q) -> np.ndarray:
  """JS(p || q) in bits over the last axis: H(m) - (H(p) + H(q)) / 2, m = (p + q) / 2."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return _entropy_bits((p + q) / 2) - (_entropy_bits(p) + _entropy_bits(q)) / 2


def mean_js(usage_DLE) -> np.ndarray:
  """[L] JS divergence averaged over every pair of domains (0 with one domain)."""
  pairs = list(itertools.combinations(range(usage_DLE.shape[0]), 2))
  if not pairs:
    return np.zeros(usage_DLE.shape[1])
  return np.mean([js_divergence(usage_DLE[a], usage_DLE[b]) for a, b in pairs], axis=0)


def entropy(usage_DLE) -> np.ndarray:
  """[n_domains, L] routing entropy of each domain in bits."""
  return _entropy_bits(usage_DLE)


def top_k_share(usage_DLE, k: int) -> np.ndarray:
  """[n_domains, L]: the share of each domain's assignments on its k most used experts."""
  return np.sort(usage_DLE, axis=-1)[..., ::-1][..., :k].sum(-1)


def maxvio(load_BLE, groups_B=None) -> np.ndarray:
  """[L] MaxVio of the loads summed over each group of sequences (groups_B: a group id a
  sequence), averaged over groups; groups_B None: one group, the global batch."""
  load_BLE = np.asarray(load_BLE, np.float64)
  groups_B = np.zeros(len(load_BLE), int) if groups_B is None else np.asarray(groups_B)
  vio = []
  for g in np.unique(groups_B):
    load_LE = load_BLE[groups_B == g].sum(0)
    mean_L = load_LE.mean(-1)
    vio.append((load_LE.max(-1) - mean_L) / np.maximum(mean_L, 1e-30))
  return np.mean(vio, axis=0)


def report(load_BLE, domain_B, domains: list[str], top_k: int, groups_B=None) -> dict:
  """The metrics above as plain floats and lists: per layer and their means over layers.
  groups_B: the micro-batch of each sequence for maxvio_micro (None: no micro scope)."""
  u = usage(load_BLE, domain_B, len(domains))
  js, h, share = mean_js(u), entropy(u), top_k_share(u, top_k)
  out = {"domains": list(domains),
         "js_divergence": float(js.mean()), "js_divergence_by_layer": js.tolist(),
         "entropy_bits": {d: float(h[i].mean()) for i, d in enumerate(domains)},
         "top_k_share": {d: float(share[i].mean()) for i, d in enumerate(domains)},
         "usage": {d: u[i].tolist() for i, d in enumerate(domains)},
         "maxvio_global": float(maxvio(load_BLE).mean())}
  if groups_B is not None:
    out["maxvio_micro"] = float(maxvio(load_BLE, groups_B).mean())
  return out
