"""The executed-work fields of a compile report, from the compiled HLO text.

Per chip per step, every loop at its trip count (train/hlo_work.py,
train/hlo_collectives.py): FLOPs by class (routed experts, attention, other, remat
recompute; grouped-matmul kernels at the tiles their live rows touch, the overflow rounds
at their balanced count), beside the analytic useful FLOPs of each class; HBM bytes;
collective bytes; under a context axis, the latent's all-gathers.

A roofline step time follows from the FLOPs and the two byte counts with the chip's
constants: compute = executed FLOPs / peak, HBM = bytes / HBM bandwidth, ICI =
collective bytes / ICI bandwidth, step = the largest (perfect overlap): a lower bound on
the step, and roofline MFU = useful FLOPs / (chips x peak x step) an upper bound.
"""

from __future__ import annotations

import math

from deepseek_jax.train import hlo, hlo_collectives, hlo_work
from deepseek_jax.train.metrics import useful_flops_by_class
from deepseek_jax.train.tpu import Chip


def causal_live_fraction(model_cfg, seq_len: int) -> float:
  """The blockwise attention's live tiles: query block i reads key blocks 0..i of n."""
  if not model_cfg.attention_impl.startswith("blockwise"):
    return 1.0
  n = max(1, math.ceil(seq_len / model_cfg.attention_block))
  return (n + 1) / (2 * n)


def context_report(hlo_text: str, cfg, model_cfg, mesh) -> dict | None:
  """Under a context axis: the all-gathers whose operand is MLA's latent (last dim
  R + P), their bytes per chip per step read from the compiled program, what gathering
  per-head K and V instead would move (the same tokens at N_local (H + P + O) values),
  and the causal work per context shard (blockwise tiles) in the zig-zag layout the
  model uses beside contiguous shards. None without a context axis."""
  n = mesh.shape.get("context", 1)
  if n == 1:
    return None
  h = hlo.read_hlo(hlo_text)
  width = model_cfg.kv_lora_rank + model_cfg.qk_rope_head_dim
  ops, runs, moved, shapes = 0, 0, 0.0, set()
  for name, instrs in h.comps.items():
    factor = h.mult.get(name, 0)
    for instr in instrs:
      if instr.op not in ("all-gather", "all-gather-start"):
        continue
      found = hlo.arrays(instr.shape)
      if not found or not all(ds and ds[-1] == width for _, ds in found):
        continue
      ops, runs = ops + 1, runs + factor
      moved += factor * max(hlo.array_bytes(instr.shape))
      dtype, ds = found[-1]
      shapes.add(f"{dtype}[{','.join(map(str, ds))}]")
  tensor = mesh.shape.get("tensor", 1)
  n_local = model_cfg.n_heads // tensor if model_cfg.n_heads % tensor == 0 else model_cfg.n_heads
  per_head = n_local * (model_cfg.qk_nope_head_dim + model_cfg.qk_rope_head_dim
                        + model_cfg.v_head_dim)
  from deepseek_jax.model.context_parallel import shard_live_tiles
  block = (model_cfg.attention_block if model_cfg.attention_impl.startswith("blockwise")
           else cfg.seq_len)
  tiles = {"zigzag": shard_live_tiles(cfg.seq_len, n, block, zigzag=True),
           "contiguous": shard_live_tiles(cfg.seq_len, n, block, zigzag=False)}
  return {"context": n, "latent_width": width, "latent_all_gathers": ops,
          "latent_gathers_per_step": runs, "latent_gather_shapes": sorted(shapes),
          "latent_bytes_per_chip": moved, "per_head_kv_width": per_head,
          "per_head_kv_bytes_per_chip": moved * per_head / width,
          "shard_live_tiles": tiles,
          "busiest_over_mean": {k: max(v) * len(v) / sum(v) for k, v in tiles.items()}}


def work_report(hlo_text: str, cfg, model_cfg, chip: Chip, n_chips: int,
                live: float | None, routing: dict | None = None) -> dict:
  """Executed vs useful work per chip per step, HBM and collective bytes, and the
  roofline step (see the module docstring) of a compiled step's HLO text; live: the rows
  a routed grouped-matmul buffer holds at balanced routing (routed_rows_per_buffer;
  None: its whole grid), or `routing` (routing_rounds: the hottest shard's rows and the
  layers' mean extra rounds, each overflow round's kernels counted as full as the
  first)."""
  h = hlo.read_hlo(hlo_text)
  extra_rounds = 0.0
  if routing is not None:
    live, extra_rounds = routing["mean_first_round_rows"], routing["mean_extra_rounds"]
  coll = hlo_collectives.collective_bytes(h, overflow_rounds=extra_rounds)
  work = hlo_work.executed_work(
      h, live_rows=live, overflow_rounds=extra_rounds,
      attention_live=causal_live_fraction(model_cfg, cfg.seq_len))
  tokens_per_chip = cfg.batch_size * cfg.seq_len / n_chips
  useful = {k: v * tokens_per_chip
            for k, v in useful_flops_by_class(model_cfg, cfg.seq_len).items()}
  by_class = {k: {"executed": float(work.flops.get(k, 0.0)),
                  "recomputed": float(work.flops.get(k + "/recompute", 0.0)),
                  "useful": useful[k]} for k in hlo_work.CLASSES}
  by_class["remat_recompute"] = {
      "executed": sum(v["recomputed"] for v in by_class.values()), "useful": 0.0}
  executed, useful_total = work.total_flops, sum(useful.values())
  compute_s = executed / chip.peak_flops
  hbm_s = work.hbm_bytes / chip.hbm_bw
  ici_s = sum(coll.values()) / chip.ici_bw
  step_s = max(compute_s, hbm_s, ici_s)
  return {
      "executed_flops_per_chip": executed, "useful_flops_per_chip": useful_total,
      "flops_by_class": by_class, "hbm_traffic_bytes_per_chip": work.hbm_bytes,
      "collective_bytes": coll,
      "roofline": {"compute_s": compute_s, "hbm_s": hbm_s, "ici_s": ici_s,
                   "step_s": step_s,
                   "mfu": useful_total / (chip.peak_flops * step_s) if step_s else 0.0},
      "work_notes": work.notes + [
          f"routed grouped-matmul buffers counted at "
          f"{'their whole grid' if live is None else f'{live:,.0f} live rows'} "
          f"({'the given routing, hottest shard' if routing else 'balanced routing'}); "
          f"overflow rounds beyond the first: {extra_rounds:g}",
          f"loop trip counts in this program: {sorted(set(h.trips))}"],
      "roofline_note": "a bound: step >= max(executed FLOPs / peak, HBM bytes / HBM "
                       "bandwidth, collective bytes / ICI bandwidth), perfect overlap; "
                       "not a measurement"}
