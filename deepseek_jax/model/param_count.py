"""Total and activated parameter counts of any configuration, without allocating it.

Activated = what one token touches: everything except the routed experts it does not
pick, i.e. routed expert weights count K/E of their size (the router counts in full).
The MTP modules are reported apart (V3's 671B/37B exclude them).
"""

from __future__ import annotations

import math
from collections import Counter

import jax

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.transformer import Transformer, abstract_variables

CATEGORIES = ("embedding", "head", "attention", "dense_ffn", "shared_experts",
              "routed_experts", "router", "norms", "mtp")


def _category(path: tuple[str, ...]) -> str:
  if path[0].startswith("mtp_"):
    return "mtp"
  if path[0] == "embed":
    return "embedding"
  if path[0] == "head":
    return "head"
  if path[-1] == "scale":
    return "norms"
  if "attn" in path:
    return "attention"
  if "ffn" in path:
    return "dense_ffn"
  if "shared" in path:
    return "shared_experts"
  if path[-1] == "w_router":
    return "router"
  if "moe" in path:
    return "routed_experts"
  raise ValueError(f"unclassified parameter {'/'.join(path)}")


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """{category: count, "total": main model, "activated": main model per token, "mtp": ...}."""
  # The parameters do not depend on the kernels: trace the plain paths (a GPU kernel
  # need not build on this backend to count its weights).
  plain = cfg.replace(attention_impl="plain", grouped_matmul="xla")
  params = abstract_variables(Transformer(plain))["params"]
  counts = Counter()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if keys[-1] == "value":  # boxed LogicallyPartitioned leaves end in `.value`
      keys = keys[:-1]
    counts[_category(keys)] += math.prod(leaf.shape)
  out = {c: counts.get(c, 0) for c in CATEGORIES}
  out["total"] = sum(v for c, v in out.items() if c != "mtp")
  inactive = out["routed_experts"] * (1 - cfg.top_k / cfg.n_routed_experts)
  out["activated"] = int(round(out["total"] - inactive))
  if cfg.mtp_depth:
    per_module = out["mtp"] // cfg.mtp_depth
    mtp_routed = (3 * cfg.d_model * cfg.moe_ffn_dim * cfg.n_routed_experts
                  if cfg.mtp_is_moe else 0)
    out["mtp_activated"] = int(round(
        out["mtp"] - cfg.mtp_depth * mtp_routed * (1 - cfg.top_k / cfg.n_routed_experts)))
    out["mtp_per_module"] = per_module
  return out


def format_counts(counts: dict[str, int]) -> str:
  lines = [f"total_params={counts['total']} activated_params={counts['activated']}"]
  for c in CATEGORIES:
    lines.append(f"  {c:16s} {counts[c]:>18,d}  ({counts[c] / 1e9:8.3f} B)")
  lines.append(f"  {'total':16s} {counts['total']:>18,d}  ({counts['total'] / 1e9:8.3f} B)")
  lines.append(f"  {'activated':16s} {counts['activated']:>18,d}  "
               f"({counts['activated'] / 1e9:8.3f} B)")
  if "mtp_activated" in counts:
    lines.append(f"  MTP modules: {counts['mtp']:,d} params ({counts['mtp'] / 1e9:.3f} B), "
                 f"{counts['mtp_activated']:,d} activated per token "
                 f"(not in total/activated, as in the V3 report)")
  return "\n".join(lines)
