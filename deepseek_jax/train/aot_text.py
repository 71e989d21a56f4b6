"""A compile report in words: the table a researcher reads before renting the slice."""

from __future__ import annotations

from deepseek_jax.train.aot_memory import gib, mesh_text, per_chip_lines
from deepseek_jax.train.tpu import GIB


def format_report(r: dict) -> str:
  """The table a researcher reads before renting the slice."""
  lines = [f"topology {r['topology']} ({r['n_chips']} chips) | mesh "
           f"{mesh_text(r['mesh'])} | "
           f"batch {r['batch'][0]} x {r['batch'][1]} in {r['microbatches']} microbatch(es) "
           f"| {r['n_layers']} layers",
           f"compile_s: {r['compile_s']:.1f}"]
  b = r.get("per_chip_bytes", {})
  lines += per_chip_lines(b, ("params", "optimizer", "arguments", "temporaries", "outputs",
                              "aliased", "total"))
  lines.append(f"  HBM per chip          {gib(r['hbm_bytes_per_chip'])}")
  rep = r.get("replicated")
  if rep:
    lines.append(f"  replicated weights (with AdamW) beyond their share: "
                 f"{gib(rep['excess_bytes_per_chip']).strip()} per chip, "
                 f"{rep['n_params']} parameters")
    for row in rep["largest"]:
      if row["excess_bytes_per_chip"] >= 2 ** 20:
        lines.append(f"    {row['param']} {row['shape']} over "
                     f"{','.join(row['replicated_over'])}: "
                     f"{gib(row['excess_bytes_per_chip']).strip()}")
  lines.append(f"fits_hbm: {'true' if r['fits_hbm'] else 'false'}")
  if not r["fits_hbm"]:
    over = b.get("total", 0) - r["hbm_bytes_per_chip"]
    if over > 0:
      lines.append(f"  over by {over / GIB:.2f} GiB per chip")
    if "error" in r:
      lines.append(f"  compiler: {r['error'][:400]}")
    return "\n".join(lines)
  lines += format_work(r)
  if "context" in r:
    c = r["context"]
    lines.append(
        f"context parallelism over {c['context']} shards: {c['latent_all_gathers']} "
        f"all-gathers of the latent (last dim {c['latent_width']}: "
        f"{', '.join(c['latent_gather_shapes'])}), run {c['latent_gathers_per_step']} "
        f"times a step, {gib(c['latent_bytes_per_chip']).strip()} a chip; per-head K/V "
        f"({c['per_head_kv_width']} wide) would be "
        f"{gib(c['per_head_kv_bytes_per_chip']).strip()}")
    t = c["shard_live_tiles"]
    lines.append(f"  causal attention tiles per context shard: zig-zag {t['zigzag']} "
                 f"(busiest {c['busiest_over_mean']['zigzag']:.2f}x the mean); contiguous "
                 f"shards would run {t['contiguous']} "
                 f"({c['busiest_over_mean']['contiguous']:.2f}x)")
  if "routing" in r:
    g, b = r["routing"], r["balanced"]
    lines.append(f"the given routing ({g['layers']} layers): hottest expert shard "
                 f"{min(g['hot_shard_load']):.2f}-{max(g['hot_shard_load']):.2f}x the "
                 f"balanced load, rounds per layer {min(g['rounds'])}-{max(g['rounds'])} "
                 f"(mean extra {g['mean_extra_rounds']:.2f}); routed experts executed "
                 f"{r['flops_by_class']['routed_experts']['executed']:.4g} vs "
                 f"{b['flops_by_class']['routed_experts']['executed']:.4g} balanced, "
                 f"roofline step {r['roofline']['step_s']:.2f} vs "
                 f"{b['roofline']['step_s']:.2f} s")
  return "\n".join(lines)


def format_work(r: dict) -> list[str]:
  """The executed-work lines of a report: FLOPs by class, HBM, collectives, notes and
  the roofline."""
  lines = []
  lines.append("executed vs useful FLOPs per chip per step (executed: first passes; "
               "recomputed: the remat's forward again):")
  for k, v in r["flops_by_class"].items():
    if k == "remat_recompute":
      continue
    ratio = (v["executed"] + v["recomputed"]) / v["useful"]
    lines.append(f"  {k:<16}{v['executed']:11.4g} executed {v['recomputed']:11.4g} "
                 f"recomputed {v['useful']:11.4g} useful  {ratio:5.2f}x "
                 f"({v['executed'] / v['useful']:.2f}x without the recompute)")
  lines.append(f"  {'total':<18}{r['executed_flops_per_chip']:12.4g} executed "
               f"{r['useful_flops_per_chip']:12.4g} useful "
               f"{r['executed_flops_per_chip'] / r['useful_flops_per_chip']:6.2f}x")
  lines.append(f"HBM traffic per chip per step: {gib(r['hbm_traffic_bytes_per_chip'])} "
               "(estimate)")
  lines.append("collectives per chip per step:")
  for k, v in r["collective_bytes"].items():
    lines.append(f"  {k:<20}{gib(v)}")
  for note in r.get("work_notes", []):
    lines.append(f"  note: {note}")
  rf = r["roofline"]
  lines.append(f"ROOFLINE (a bound, not measured): step >= {rf['step_s']:.2f} s (compute "
               f"{rf['compute_s']:.2f} s, HBM {rf['hbm_s']:.2f} s, ICI {rf['ici_s']:.2f} s), "
               f"roofline_mfu {rf['mfu']:.3f}")
  return lines
