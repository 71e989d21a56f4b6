"""DeepSeek-V3 671B (37B activated) pre-training at V3's scale: the layout for a TPU pod.

  python -m experiments.param_count --config=configs/deepseek_v3_671b.py
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x16x16
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8
  python -m experiments.prepare_data --inputs='corpus/*.jsonl' --workers=64 \
      --tokenizer=DeepSeek-V3/tokenizer.json --out=data/v3     # V3's 128K BPE
  python -m experiments.train --config=configs/deepseek_v3_671b.py --workdir=gs://... \
      --config.data.paths=data/v3 --distributed
  python -m experiments.train --config=configs/deepseek_v3_671b.py:cpu --workdir=/tmp/v3cpu \
      --cpu_devices=8      # the same layout and code paths cut down for a laptop
  python -m experiments.train --config=configs/deepseek_v3_671b.py:cpu,32k \
      --workdir=/tmp/v3cpu32k --config.init_from=/tmp/v3cpu --cpu_devices=8
      # an extension stage (32k, then 128k) from the pre-training run's weights
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8 \
      --stage=128k
The mesh takes its size from the slice (fsdp = -1), so one file serves 512, 1,024 and
2,048 chips. Why this layout (docs/pod.md has the compiler's numbers):
  tensor=2   15,360 sequences do not split over 2,048 chips; with heads, FFN widths and
             the vocabulary over 2 chips (and the MoE's tokens split over them by
             sequence), the batch splits over 256 / 512 / 1,024 shards: 60 / 30 / 15
             sequences each.
  expert=64  4 routed experts per chip; V3's 8 routing groups then span 8 shards each.
  fsdp=-1    every weight and its AdamW moments are sharded over fsdp x expert
             (routed experts over expert x fsdp), gathered per layer.
  microbatches=-1: one sequence per batch shard per microbatch (60 / 30 / 15 of them).
Plain RoPE: V3 pre-trains at 4K without YaRN and extends the context afterwards; the
released model's YaRN (the preset, HF import) belongs to the extension stages.
"""

from configs import common
from deepseek_jax.model import config as model_config
from deepseek_jax.train.recipe import Recipe


def get_config(arg=None):
  """arg "cpu": the same config (scan, remat, blockwise attention, ragged experts, EP
  capacity, a tensor axis) with every size cut so that it trains on 8 CPU devices."""
  model = model_config.deepseek_v3_671b().replace(
      rope_factor=1.0,             # pre-training: plain RoPE at 4K (YaRN comes later)
      scan_layers=True,            # compile time and program size independent of depth
      # save the weight matmuls' outputs, recompute the rest (fits 512 chips at 64.8 GiB
      # against 48.6 with "nothing", and skips a ~1/4 recompute: docs/history.md, "Pod
      # scale before the ragged exchange", remat policy)
      remat=True, remat_policy="dots_no_batch",
      # and keep the routed experts' gate/up products: no routed matmul runs twice
      # (docs/pod.md, "Pod efficiency": 1.11x instead of 1.33x the routed experts' useful
      # FLOPs, for 8.8 GiB a chip at 512 chips; "" gives that memory back)
      remat_save_experts="moe_gate,moe_up",
      attention_impl="blockwise", attention_block=512,
      moe_dispatch="ragged",       # grouped matmul: each expert's weights read once,
      grouped_matmul="megablox",   # over the tiles that hold rows (forward and backward)
      ep_exchange="ragged",        # ragged_all_to_all: only assignments travel, into
      ep_capacity_factor=1.25,     # a receive buffer of 1.25 x tokens x K rows; what a
      ep_overflow="rounds")        # destination cannot take goes in more rounds: V3
                                   # drops no token (report 2.1.2)
  c = common.base_config(model)
  c.seq_len = 4096
  c.microbatches = -1          # one sequence per batch shard per microbatch
  # V3's recipe (report 4.2; SPEC.md section 6) as token-based phases (train/recipe.py;
  # `python -m experiments.schedule --config=configs/deepseek_v3_671b.py` shows it).
  # The report is silent on the ramp's granularity: four equal-token stages, 3,072 ->
  # 12,288 in steps of 3,072 over 469B tokens, then 15,360 (each stage its own compiled
  # program; experiments.compile --stage picks one).
  c.schedule.lr = ("linear 0 -> 2.2e-4 for 2000 steps; constant 2.2e-4 until 10T; "
                   "cosine 2.2e-4 -> 2.2e-5 for 4.3T; constant 2.2e-5 for 333B; "
                   "constant 7.3e-6 for 167B")
  c.schedule.batch_size = ("3072 for 117.25B; 6144 for 117.25B; 9216 for 117.25B; "
                           "12288 for 117.25B; 15360")
  c.schedule.mtp_lambda = "0.3 until 10T; 0.1"
  c.schedule.bias_rate = "0.001 until 14.3T; 0"   # frozen for the last 500B tokens
  c.batch_size = 15360         # the largest stage
  c.total_steps = Recipe(c).total_steps           # 14.8T tokens with the ramp
  # The step-based fields the recipe replaces, kept in agreement for reading.
  c.optimizer.peak_lr = 2.2e-4
  c.optimizer.warmup_steps = 2000
  c.mtp_lambda, c.mtp_lambda_late = 0.3, 0.1
  c.balance.bias_rate = 0.001
  c.balance.seq_aux_alpha = 0.0001
  # V3 packs documents into sequences without cross-sample attention masking (report
  # 4.1); the targets then cross document boundaries too (train/losses.py).
  c.data.doc_attention_mask = False
  # No default corpus at this size: a dataset prepared with V3's tokenizer (vocab
  # 129,280 rows; docs/usage.md, "Train on your own data"), given on the command line:
  #   --config.data.paths=DIR  (or DIR1:0.7,DIR2:0.3 for a mixture)
  c.data.source = "prepared"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.expert = 64
  c.mesh.tensor = 2
  # V3's context extension (report 4.3): 1,000 steps at 32K x 1,920, then 1,000 at
  # 128K x 480 (62.9M tokens a step, as pre-training), lr 7.3e-6, YaRN s = 40 over the
  # 4K original (beta_fast 32, beta_slow 1, mscale 0.1 ln s + 1: the preset's). Each
  # sequence split over "context" (4 and 16 shards: 8K positions a shard), the experts
  # over fewer shards as the batch shrinks (a batch shard must hold a sequence). The
  # routed experts' products are recomputed in the backward rather than kept
  # (remat_save_experts off): kept, they took 18 GiB a chip at 32K. At 128K the whole
  # sequence's K and V (5 GiB a layer a chip, and their gradients) do not fit beside the
  # rest: attention up-projects them one key block at a time (blockwise_latent).
  long = dict(remat_save_experts="")
  c.extension = {
      "32k": dict(seq_len=32768, batch_size=1920, steps=1000, lr=7.3e-6, rope_factor=40.0,
                  rope_original_max_len=4096, model=long,
                  mesh=dict(data=1, fsdp=-1, expert=64, context=4, tensor=2)),
      "128k": dict(seq_len=131072, batch_size=480, steps=1000, lr=7.3e-6, rope_factor=40.0,
                   rope_original_max_len=4096,
                   model=dict(long, attention_impl="blockwise_latent"),
                   mesh=dict(data=1, fsdp=-1, expert=16, context=16, tensor=2)),
  }
  words = [w for w in (arg or "").split(",") if w]
  unknown = [w for w in words if w not in ("cpu", "32k", "128k")]
  if unknown:
    raise ValueError(f"deepseek_v3_671b: unknown variant {unknown[0]!r} (known: cpu, "
                     "32k, 128k, and cpu with one of them: cpu,32k)")
  if "cpu" in words:
    _cut_down(c)
  stages = [w for w in words if w != "cpu"]
  return common.extension_stage(c, stages[0]) if stages else c


def _cut_down(c):
  """V3's structure at toy sizes: 3 dense + 2 MoE layers, groups, MTP, the byte
  tokenizer (vocab 258: its 257 tokens, rounded up to split over tensor=2); mesh
  fsdp=-1 x expert=2 x tensor=2 (2 x 2 x 2 on 8 CPU devices)."""
  sizes = dict(vocab_size=258, d_model=64, n_layers=5, n_heads=4, q_lora_rank=32,
               kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               ffn_dim=128, moe_ffn_dim=32, n_routed_experts=16, top_k=4, n_group=4,
               topk_group=2, attention_block=16, init_std=0.02)
  for k, v in sizes.items():
    c.model[k] = v
  c.data.source, c.data.tokenizer = "stdlib", "bytes"   # the embedded corpus, bytes
  c.batch_size, c.seq_len, c.microbatches = 16, 64, 2
  # V3's recipe shape at toy token counts (1,024 tokens a step at the full batch): a
  # two-stage batch ramp, warmup, constant, cosine, two constant tails, the MTP and bias
  # switches; 41 steps.
  c.schedule.lr = ("linear 0 -> 3e-3 for 5 steps; constant 3e-3 until 20K; "
                   "cosine 3e-3 -> 3e-4 for 10K; constant 3e-4 for 2K; constant 1e-4 for 1K")
  c.schedule.batch_size = "8 for 8K; 16"
  c.schedule.mtp_lambda = "0.3 until 24K; 0.1"
  c.schedule.bias_rate = "0.001 until 30K; 0"
  c.total_steps = Recipe(c).total_steps
  c.log_every, c.eval_every, c.checkpoint_every = 5, 20, 20
  c.eval_batches = 2
  c.final_eval_batches = 16    # not the whole validation set (minutes at 32K on a CPU)
  c.optimizer.peak_lr, c.optimizer.warmup_steps = 3e-3, 5
  c.mesh.expert = 2
  # The extension stages at toy lengths: 4x then 16x the 64-token pre-training context
  # (YaRN s = 16 over an original 64), the same 1,024 tokens a step, 10 steps each.
  c.extension = {
      "32k": dict(seq_len=256, batch_size=4, steps=10, lr=1e-4, rope_factor=16.0,
                  rope_original_max_len=64, microbatches=1,
                  mesh=dict(data=1, fsdp=1, expert=2, context=2, tensor=2)),
      "128k": dict(seq_len=1024, batch_size=1, steps=10, lr=1e-4, rope_factor=16.0,
                   rope_original_max_len=64, microbatches=1,
                   model=dict(attention_impl="blockwise_latent"),
                   mesh=dict(data=1, fsdp=1, expert=1, context=4, tensor=2)),
  }
