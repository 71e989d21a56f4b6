"""ModelConfig validation, presets, config files and parameter counts."""

import glob
import importlib.util
import math
import os

import pytest

from deepseek_jax.model import config
from deepseek_jax.model.param_count import count_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_every_preset_validates(name):
  cfg = config.preset(name)
  assert cfg == config.ModelConfig.from_dict(cfg.to_dict())


@pytest.mark.parametrize("changes, field, rule", [
    (dict(top_k=9), "top_k", "cannot exceed n_routed_experts"),
    (dict(n_group=3), "n_group", "must divide n_routed_experts"),
    (dict(n_group=2, topk_group=3), "topk_group", "cannot exceed n_group"),
    (dict(n_group=4, topk_group=1, top_k=3), "topk_group", "fewer than top_k"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim", "must be even"),
    (dict(d_model=0), "d_model", "positive integer"),
    (dict(n_heads=-2), "n_heads", "positive integer"),
    (dict(q_lora_rank=0), "q_lora_rank", "positive integer or None"),
    (dict(first_k_dense=4), "first_k_dense", "cannot exceed n_layers"),
    (dict(n_group=8, topk_group=4), "n_group", "at least 2 experts"),
    (dict(score_func="relu"), "score_func", "must be one of"),
    (dict(moe_dispatch="sparse"), "moe_dispatch", "must be one of"),
    (dict(attention_impl="flash"), "attention_impl", "must be one of"),
    (dict(remat_policy="some"), "remat_policy", "must be one of"),
    (dict(ep_capacity_factor=0.0), "ep_capacity_factor", "must be positive"),
    (dict(ep_overflow="spill"), "ep_overflow", "must be one of"),
    (dict(ep_exchange="sparse"), "ep_exchange", "must be one of"),
    (dict(remat_save_experts="moe_gate,moe_h"), "remat_save_experts", "comma-separated"),
    (dict(ep_exchange="ragged", moe_dispatch="ragged"), "ep_exchange",
     "sizes its receive buffer by ep_capacity_factor"),
    (dict(ep_exchange="ragged", moe_dispatch="ragged", ep_capacity_factor=1.25,
          ep_overflow="drop"), "ep_exchange", "ep_overflow='rounds'"),
    (dict(grouped_matmul="megablox"), "grouped_matmul", "set moe_dispatch='ragged'"),
    (dict(bias_mode="pow"), "bias_mode", "must be one of"),
    (dict(rope_factor=0.5), "rope_factor", ">= 1"),
    (dict(dtype="float64"), "dtype", "must be one of"),
    (dict(rms_eps=0.0), "rms_eps", "must be positive"),
    # tiny(): 4 groups, keep 2 -- QB's plain top-K thresholds would not match it
    (dict(quantile_stats=True), "quantile_stats", "topk_group=2 < n_group=4"),
])
def test_bad_config_names_field_and_rule(changes, field, rule):
  with pytest.raises(ValueError) as e:
    config.tiny().replace(**changes)
  assert f"ModelConfig.{field}" in str(e.value) and rule in str(e.value)


def test_unknown_field_and_preset():
  with pytest.raises(ValueError, match="unknown field"):
    config.ModelConfig.from_dict({"d_modle": 3})
  # A removed field reads at the value the model still computes, and only at that one.
  saved = dict(config.tiny().to_dict(), aux_group_limited=False)
  assert config.ModelConfig.from_dict(saved) == config.tiny()
  with pytest.raises(ValueError, match="aux_group_limited was removed"):
    config.ModelConfig.from_dict(dict(saved, aux_group_limited=True))
  with pytest.raises(ValueError, match="unknown model preset"):
    config.preset("gpt5")


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg_under_test", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_every_config_file_loads_and_validates(path):
  if os.path.basename(path) in ("__init__.py", "common.py"):
    pytest.skip("helper module, not a config")
  c = _load(path)
  for field in ("total_steps", "checkpoint_every", "eval_every", "seed"):
    assert field in c, field
  for axis in ("data", "fsdp", "expert", "tensor"):
    assert axis in c.mesh
  config.model_config_from(c.model)


def _hand_count(cfg):
  D, N, H, P, O, R, Q = (cfg.d_model, cfg.n_heads, cfg.qk_nope_head_dim,
                         cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
                         cfg.q_lora_rank)
  attn = D * Q + Q + Q * N * (H + P) + D * (R + P) + R + R * N * (H + O) + N * O * D
  dense = 3 * D * cfg.ffn_dim
  shared = 3 * D * cfg.moe_ffn_dim * cfg.n_shared_experts
  routed = 3 * D * cfg.moe_ffn_dim * cfg.n_routed_experts
  router = D * cfg.n_routed_experts
  n_moe = cfg.n_layers - cfg.first_k_dense
  norms = 2 * D
  layer_norms = cfg.n_layers * norms + D  # two per block, plus the final norm
  total = (2 * cfg.vocab_size * D + cfg.n_layers * attn + cfg.first_k_dense * dense
           + n_moe * (shared + routed + router) + layer_norms)
  activated = total - n_moe * routed * (1 - cfg.top_k / cfg.n_routed_experts)
  mtp = cfg.mtp_depth * (3 * D + 2 * D * D + attn + norms + shared + routed + router)
  return total, activated, mtp


def test_param_count_matches_hand_count():
  cfg = config.tiny()
  counts = count_params(cfg)
  total, activated, mtp = _hand_count(cfg)
  assert counts["total"] == total
  assert counts["activated"] == round(activated)
  assert counts["mtp"] == mtp


def test_deepseek_v3_sizes():
  counts = count_params(config.deepseek_v3_671b())
  assert 670e9 < counts["total"] < 672e9       # the report: 671B
  assert 37e9 < counts["activated"] < 38e9     # the report: 37B
  assert counts["total"] == _hand_count(config.deepseek_v3_671b())[0]


@pytest.mark.parametrize("n_chips,data,fsdp", [(512, 1, 4), (2048, 1, 16), (1536, 3, 4),
                                               (384, 3, 1)])
def test_671b_layout_shards_abstractly_on_a_pod_mesh(n_chips, data, fsdp):
  """The pod config's model builds abstractly and every weight gets a valid sharding on
  its mesh (fsdp = -1 filled by the slice), without allocating anything; FSDP leaves no
  large weight replicated: a chip holds at most ~1.1x its share of the parameters (1/n
  of them over the chips of one data replica). A slice with a factor 3 (1,536, 384)
  takes it as data replicas: fsdp = 12 would divide neither d_model nor any expert dim
  and replicate those weights over it."""
  import math
  import jax
  import flax.linen as nn
  from jax.sharding import AbstractMesh, AxisType
  from deepseek_jax.train import sharding
  from deepseek_jax.model.transformer import Transformer, abstract_variables
  c = _load(os.path.join(REPO, "configs", "deepseek_v3_671b.py"))
  cfg = config.model_config_from(c.model)
  sizes = sharding.mesh_shape(c.mesh, n_chips, cfg.d_model)
  assert (sizes["data"], sizes["fsdp"]) == (data, fsdp)
  if data > 1:      # without the model's d_model the free axis takes it all
    assert sharding.mesh_shape(c.mesh, n_chips)["fsdp"] == data * fsdp
  shape = tuple(sizes[a] for a in sharding.MESH_AXES)
  mesh = AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))
  boxed = abstract_variables(Transformer(cfg))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  experts_sharded, total, per_chip = 0, 0, 0.0
  for leaf in leaves:
    spec = sharding.logical_to_spec(leaf.names, leaf.value.shape, mesh)
    ways = 1
    for dim, axes in zip(leaf.value.shape, spec):
      if axes is not None:
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        assert dim % size == 0
        ways *= size
    total += leaf.value.size
    per_chip += leaf.value.size / ways
    experts_sharded += "expert" in [a for a in spec if isinstance(a, str)]
  assert experts_sharded >= 3 * (1 + cfg.mtp_depth)   # the MoE stack's and the MTP's
  assert total > 6.7e11
  assert per_chip < 1.1 * total / (n_chips / data), (per_chip, total / n_chips)


def test_671b_config_follows_v3_where_the_report_is_explicit():
  """Against the report's numbers (SPEC.md section 6), not the config's own arithmetic:
  the bias update rate is 0 for the last 500B of 14.8T tokens; documents are packed
  without cross-sample attention masking; no token is dropped (report 2.1.2: the
  expert-parallel buffers send their overflow in rounds)."""
  from configs import deepseek_v3_671b
  from deepseek_jax.train import step as train_step
  from deepseek_jax.train.recipe import Recipe
  c = deepseek_v3_671b.get_config()
  r = Recipe(c)   # steps <-> tokens through the batch ramp (tests/train/test_recipe.py)
  tokens_per_step = c.batch_size * c.seq_len
  assert 0 <= r.tokens_at_step(c.total_steps) - 14.8e12 < tokens_per_step
  freeze = train_step.balance_hparams(c)["bias_freeze_step"]
  assert 0 <= r.tokens_at_step(freeze) - 14.3e12 < tokens_per_step
  assert c.balance.bias_rate == 0.001
  assert c.data.doc_attention_mask is False
  assert c.model.ep_overflow == "rounds" and c.model.moe_dispatch != "capacity"


@pytest.mark.parametrize("variant", ["32k", "128k", "cpu,32k", "cpu,128k"])
def test_671b_extension_stages_follow_v3(variant):
  """V3 report 4.3: each stage trains as many tokens a step as pre-training, at a
  constant 7.3e-6, with YaRN s = 40 over the 4K original; the bias frozen; the mesh
  splits each sequence over "context" and fills the slice; the model validates."""
  import importlib.util
  from deepseek_jax.train import sharding
  spec = importlib.util.spec_from_file_location(
      "v3", os.path.join(REPO, "configs", "deepseek_v3_671b.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  pre = mod.get_config("cpu" if variant.startswith("cpu") else None)
  c = mod.get_config(variant)
  assert c.seq_len * c.batch_size == pre.seq_len * pre.batch_size
  ratio = {"32k": 8, "128k": 32, "cpu,32k": 4, "cpu,128k": 16}[variant]
  assert c.seq_len == ratio * pre.seq_len
  model = config.model_config_from(c.model)
  assert model.yarn and model.rope_original_max_len == pre.seq_len
  assert c.balance.bias_rate == 0 and not c.schedule.lr and c.total_steps == c.extension[
      variant.split(",")[-1]].steps
  if not variant.startswith("cpu"):
    assert (c.optimizer.peak_lr, model.rope_factor) == (7.3e-6, 40.0)
    sizes = sharding.mesh_shape(c.mesh, 512, model.d_model)
    assert sizes["context"] > 1 and c.seq_len % sizes["context"] == 0
    assert c.batch_size % math.prod(sizes[a] for a in ("data", "fsdp", "expert")) == 0
