"""The DeepSeek-V3 model: embedding, decoder blocks (dense first, then MoE), final norm,
output head, and the MTP modules that share the embedding and the head.

Balancing state lives in its own variable collection, "balance": one float32 array
`expert_bias` [L, E] with a row per routed layer (main MoE layers in order, then the MTP
blocks). It is read, never written, by the model: the train step updates it from the
MoEStats the model returns (stacked the same way, leading dim L).

Inference (kv_cache.py, decoding.py, speculative.py) uses two more methods on the same
parameters: `extend` runs a chunk of tokens against a latent KV cache (prefill, decode,
verification), `mtp_extend` runs one MTP module against its own cache (drafting).

Layer layout. By default every block has its own parameters, "layer_0" .. "layer_{n-1}".
With cfg.scan_layers the dense blocks and the MoE blocks form two stacks,
"dense_layers/block" and "moe_layers/block", each parameter with a leading layer dim
(logical axis "layers"), run by one flax scan each: the program holds one block of each
kind whatever the depth. stack_layers / unstack_layers convert between the two layouts
(HF import/export and the cached decode use the unrolled one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from deepseek_jax.model import context_parallel
from deepseek_jax.model.block import Block, remat_block
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.kv_cache import KVCache
from deepseek_jax.model.layers import RMSNorm, linear, param
from deepseek_jax.model.moe import MoEStats
from deepseek_jax.model.partitioning import CONTEXT, axis_size, constrain, gathered
from deepseek_jax.model.mtp import MTPModule, shift_left

BALANCE = "balance"
STACKS = ("dense_layers", "moe_layers")   # the scanned layout's two stacks
# The residual stream between blocks: split over every batch axis and (context
# parallelism) along the sequence, whole in width, so propagation never follows the
# fsdp-sharded weights into the activations.
RESIDUAL = ("batch", "length", None)


@struct.dataclass
class ModelOutput:
  logits: jax.Array                  # [B, T, V] float32: predicts token i+1 at position i
  mtp_logits: jax.Array | None       # [D_mtp, B, T, V]: depth k predicts token i+k+1
  moe: MoEStats | None               # stacked over routed layers, leading dim L
  hidden: jax.Array                  # [B, T, D] last hidden state before the final norm


@struct.dataclass
class DecodeOutput:
  logits: jax.Array    # [B, T, V] float32
  hidden: jax.Array    # [B, T, D] what the next MTP module reads (cfg.mtp_feed_normed)


def _leading(stats):
  return jax.tree.map(lambda a: a[None], stats)


def _concat(stats):
  """One MoEStats with leading dim L from pieces with leading dims (a scan's [n] or [1])."""
  if not stats:
    return None
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats)


class _ScanBlock(nn.Module):
  """A block as a scan body: (x, bias_E) -> (x, MoEStats | None); the rest broadcast."""
  cfg: ModelConfig
  moe: bool

  @nn.compact
  def __call__(self, x_BTD, bias_E, pos_BT, segment_ids_BT, valid_BT):
    x_BTD, stats = remat_block(self.cfg)(self.cfg, moe=self.moe, name="block")(
        x_BTD, pos_BT, segment_ids_BT, valid_BT, bias_E)
    return constrain(x_BTD, RESIDUAL), stats


def _stack_of(cfg: ModelConfig, moe: bool, n: int):
  """n blocks of one kind as ONE scanned module: parameters [n, ...] on logical axis
  "layers"; the MoE stack scans over the bias rows [n, E] and stacks its MoEStats."""
  scanned = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(0 if moe else nn.broadcast, nn.broadcast, nn.broadcast,
                             nn.broadcast),
                    length=n, metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, moe, name=STACKS[int(moe)])


def stack_layers(params, cfg: ModelConfig):
  """Unrolled params ("layer_i") -> the scanned layout (STACKS, leading layer dim)."""
  params = dict(params)
  layers = [params.pop(f"layer_{i}") for i in range(cfg.n_layers)]
  groups = (layers[:cfg.first_k_dense], layers[cfg.first_k_dense:])
  for name, group in zip(STACKS, groups):
    if group:
      params[name] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *group)}
  return params


def unstack_layers(params, cfg: ModelConfig):
  """The scanned layout -> unrolled params ("layer_i"), the inverse of stack_layers."""
  params = dict(params)
  i = 0
  for name, n in zip(STACKS, (cfg.first_k_dense, cfg.n_moe_layers)):
    if n:
      stacked = params.pop(name)["block"]
      for j in range(n):
        params[f"layer_{i}"] = jax.tree.map(lambda x, j=j: x[j], stacked)
        i += 1
  return params


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    # Gathered in embed_tokens after the cast to the compute dtype (param's float32
    # gather cost whole [V, D] float32 copies, 3.45 GiB each for V3, at 32K).
    self.embed = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg,
                       gather=cfg.tie_embeddings)
    if cfg.scan_layers:
      n_dense = cfg.first_k_dense
      self.dense_layers = _stack_of(cfg, False, n_dense) if n_dense else None
      self.moe_layers = _stack_of(cfg, True, cfg.n_moe_layers) if cfg.n_moe_layers else None
    else:
      block_cls = remat_block(cfg)
      self.blocks = [block_cls(cfg, moe=cfg.is_moe_layer(i), name=f"layer_{i}")
                     for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.head = param(self, "head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)
    self.mtp = [MTPModule(cfg, name=f"mtp_{k}") for k in range(cfg.mtp_depth)]
    if cfg.n_routed_layers:
      init = jnp.ones if cfg.bias_mode == "mul" else jnp.zeros   # neutral bias
      self.expert_bias = self.variable(
          BALANCE, "expert_bias", init, (cfg.n_routed_layers, cfg.n_routed_experts),
          jnp.float32)

  def embed_tokens(self, tokens_BT):
    table_VD = self.embed
    if axis_size(CONTEXT) > 1 and not self.cfg.tie_embeddings:
      table_VD = gathered(table_VD.astype(self.cfg.jnp_dtype), ("vocab", "embed"))
    return jnp.take(table_VD, tokens_BT, axis=0).astype(self.cfg.jnp_dtype)

  def logits(self, normed_BTD):
    w_DV = self.embed.T if self.cfg.tie_embeddings else self.head
    logits_BTV = linear(normed_BTD, w_DV.astype(self.cfg.jnp_dtype),
                        preferred_element_type=jnp.float32)
    # Batch over the batch axes, the vocabulary over "tensor": no chip holds a whole
    # [tokens, V] row of logits when the mesh has a tensor axis.
    return constrain(logits_BTV, ("batch", "length", "vocab"))

  def _bias(self, row):
    if not self.cfg.n_routed_layers:
      return None
    return self.expert_bias.value[row]

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, mtp=True):
    """tokens [B, T] int; positions default to 0..T-1; segment_ids (packed documents,
    0 = padding) restrict attention to the same document when given."""
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid_BT = (jnp.ones((B, T), bool) if segment_ids_BT is None else segment_ids_BT != 0)
    # Under context parallelism the blocks run in the zig-zag layout (causal work even
    # over the shards: context_parallel.py); hidden states return to sequence order
    # before the head, so logits and losses never see it.
    if context_parallel.context_size() > 1:
      lay, unlay = context_parallel.to_zigzag, context_parallel.from_zigzag
    else:
      lay = unlay = lambda a: a
    tokens_in = tokens_BT
    tokens_BT, positions_BT = lay(tokens_BT), lay(positions_BT)
    segments_z = None if segment_ids_BT is None else lay(segment_ids_BT)
    valid_z = valid_BT if segments_z is None else segments_z != 0

    x_BTD = self.embed_tokens(tokens_BT)
    x_BTD = constrain(x_BTD, RESIDUAL)
    stats, row = [], 0
    if cfg.scan_layers:
      if self.dense_layers is not None:
        x_BTD, _ = self.dense_layers(x_BTD, None, positions_BT, segments_z, valid_z)
      if self.moe_layers is not None:
        bias_LE = self.expert_bias.value[:cfg.n_moe_layers]
        x_BTD, stats_L = self.moe_layers(x_BTD, bias_LE, positions_BT, segments_z, valid_z)
        stats, row = [stats_L], cfg.n_moe_layers
    else:
      for i, block in enumerate(self.blocks):
        x_BTD, s = block(x_BTD, positions_BT, segments_z, valid_z,
                         self._bias(row) if cfg.is_moe_layer(i) else None)
        if s is not None:
          stats.append(_leading(s))
          row += 1
    logits_BTV = self.logits(unlay(self.final_norm(x_BTD)))

    mtp_logits = None
    if mtp and cfg.mtp_depth:
      h_BTD = self.final_norm(x_BTD) if cfg.mtp_feed_normed else x_BTD
      depth_logits = []
      for k, module in enumerate(self.mtp, start=1):
        # Position i reads token i+k: valid only if it exists in the same document.
        valid_k = shift_left(valid_BT, k, False) & valid_BT
        if segment_ids_BT is not None:
          valid_k &= shift_left(segment_ids_BT, k) == segment_ids_BT
        h_BTD, normed_BTD, s = module(
            h_BTD, self.embed_tokens(lay(shift_left(tokens_in, k))), positions_BT,
            segments_z, lay(valid_k), self._bias(row) if cfg.mtp_is_moe else None)
        if cfg.mtp_feed_normed:
          h_BTD = normed_BTD
        if s is not None:
          stats.append(_leading(s))
          row += 1
        depth_logits.append(self.logits(unlay(normed_BTD)))
      mtp_logits = jnp.stack(depth_logits)
    elif cfg.mtp_is_moe and cfg.mtp_depth and stats:
      # Keep the stats' L dim equal to the bias rows; skipped MTP layers route nothing.
      zero = jax.tree.map(lambda a: jnp.zeros((cfg.mtp_depth,) + a.shape[1:], a.dtype),
                          stats[-1])
      stats.append(zero)
    return ModelOutput(logits=logits_BTV, mtp_logits=mtp_logits, moe=_concat(stats),
                       hidden=unlay(x_BTD))

  # Inference ------------------------------------------------------------------------

  def extend(self, tokens_BT, cache: KVCache, n_new_B=None, *, absorb: bool = True):
    """Runs a chunk of T tokens per row after its cache.lengths cached tokens, at RoPE
    positions lengths .. lengths+T-1 (a prompt chunk, one decode token, or the
    speculative drafts). n_new_B [B] of the T are real, the rest padding (default all).

    Returns (DecodeOutput, cache with the chunk written and lengths advanced by n_new).
    The logits equal those of __call__ on the whole sequence at the same positions.
    """
    cfg = self.cfg
    _unrolled_only(cfg)
    B, T = tokens_BT.shape
    if n_new_B is None:
      n_new_B = jnp.full((B,), T, jnp.int32)
    valid_BT = jnp.arange(T)[None, :] < n_new_B[:, None]
    x_BTD = self.embed_tokens(tokens_BT)
    for i, block in enumerate(self.blocks):
      bias = self._bias(i - cfg.first_k_dense) if cfg.is_moe_layer(i) else None
      x_BTD, cache, _ = block.decode(x_BTD, cache, i, n_new_B, valid_BT, bias, absorb)
    normed_BTD = self.final_norm(x_BTD)
    out = DecodeOutput(logits=self.logits(normed_BTD),
                       hidden=normed_BTD if cfg.mtp_feed_normed else x_BTD)
    return out, cache.with_lengths(cache.lengths + n_new_B)

  def mtp_extend(self, k: int, h_prev_BTD, tokens_next_BT, cache: KVCache, n_new_B, *,
                 absorb: bool = True):
    """MTP module k (1-based) on a chunk: position i reads h_{k-1}[i] and token i+k
    (tokens_next_BT), and its logits predict token i+k+1; as in __call__.

    `cache` is the MTP cache, layer k-1 being module k's. Its lengths are NOT advanced:
    the D modules cover the same positions, so the caller sets them once.
    Returns (DecodeOutput with hidden = h_k as module k+1 reads it, cache).
    """
    cfg = self.cfg
    T = tokens_next_BT.shape[1]
    valid_BT = jnp.arange(T)[None, :] < n_new_B[:, None]
    bias = self._bias(cfg.n_moe_layers + k - 1) if cfg.mtp_is_moe else None
    h_BTD, normed_BTD, cache, _ = self.mtp[k - 1].decode(
        h_prev_BTD, self.embed_tokens(tokens_next_BT), cache, k - 1, n_new_B, valid_BT,
        bias, absorb)
    out = DecodeOutput(logits=self.logits(normed_BTD),
                       hidden=normed_BTD if cfg.mtp_feed_normed else h_BTD)
    return out, cache


def _unrolled_only(cfg: ModelConfig):
  if cfg.scan_layers:
    raise ValueError("cached decoding runs the unrolled layout: convert the params with "
                     "unstack_layers and use cfg.replace(scan_layers=False) "
                     "(inference.decoding.load_workdir does this)")


def init_variables(model: Transformer, rng, batch=1, seq=8):
  """Unboxed variables {"params": ..., "balance": ...} (balance absent with no MoE)."""
  tokens = jnp.zeros((batch, seq), jnp.int32)
  return nn.unbox(model.init(rng, tokens))


def abstract_variables(model: Transformer, batch=1, seq=8):
  """Boxed ShapeDtypeStructs with logical axis metadata, allocating nothing."""
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
