"""The compiled program's executed work (train/hlo_work.py) on programs compiled here for
a v5p chip, against counts made by hand: matmul FLOPs by valid window positions, loop
trips, the overflow-rounds loop at the rounds it is given, grouped-matmul kernels at the
tiles their live rows touch (XLA's ragged-dot kernel and megablox's gmm / tgmm, decoded
from their Mosaic bodies), and XLA's ragged-dot weight gradient as the per-group masked
product it is. Needs libtpu (the `tpu` extra)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from deepseek_jax.model.ragged_exchange import OVERFLOW_SCOPE
from deepseek_jax.train import hlo, hlo_work, tpu

pytest.importorskip("libtpu", reason="TPU compilation needs libtpu: pip install -e '.[tpu]'")

M, K, N, G = 2048, 256, 512, 4


@pytest.fixture(scope="module")
def one_chip():
  devices = tpu.topology_devices("v5p:2x2x1")[:1]
  return NamedSharding(Mesh(np.array(devices), ("d",)), PS())


def _compile(fn, sharding, *shapes):
  args = [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in shapes]
  return hlo.read_hlo(jax.jit(fn).lower(*args).compile().as_text())


def test_matmul_flops_and_loop_trips(one_chip):
  """A scan of 8 [64, 512] x [512, 512] products: 8 x 2 x 64 x 512 x 512 FLOPs, where
  XLA's cost analysis counts the body once."""
  def f(x, ws):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]
  h = _compile(f, one_chip, ((64, 512), jnp.float32), ((8, 512, 512), jnp.float32))
  assert 8 in h.trips
  w = hlo_work.executed_work(h)
  assert w.total_flops == pytest.approx(8 * 2 * 64 * 512 * 512, rel=1e-6)
  # HBM: at least each step's weight slice and the activations it reads and writes.
  assert w.hbm_bytes >= 8 * (512 * 512 * 4 + 2 * 64 * 512 * 4)


def test_overflow_rounds_loop_counts_the_rounds_it_is_given(one_chip):
  def f(x, w, n):
    with jax.named_scope(OVERFLOW_SCOPE):
      return jax.lax.fori_loop(0, n, lambda i, y: y + jnp.tanh((x + y) @ w),
                               jnp.zeros_like(x))
  h = _compile(f, one_chip, ((64, 512), jnp.float32), ((512, 512), jnp.float32),
               ((), jnp.int32))
  one = 2 * 64 * 512 * 512
  assert hlo_work.executed_work(h, overflow_rounds=0).total_flops == 0
  assert (hlo_work.executed_work(h, overflow_rounds=3).total_flops
          == pytest.approx(3 * one))
  # The same loop unnamed: a data-dependent trip count, counted once and said so.
  def g(x, w, n):
    return jax.lax.fori_loop(0, n, lambda i, y: y + jnp.tanh((x + y) @ w),
                             jnp.zeros_like(x))
  w = hlo_work.executed_work(_compile(g, one_chip, ((64, 512), jnp.float32),
                                 ((512, 512), jnp.float32), ((), jnp.int32)))
  assert w.total_flops == pytest.approx(one)
  assert any("data-dependent" in n for n in w.notes)


def _tiles(rows, groups, tm):
  """Row tiles `rows` rows in equal consecutive groups touch (by hand)."""
  edges = [rows * g / groups for g in range(groups + 1)]
  return sum(math.ceil(edges[g + 1] / tm) - math.floor(edges[g] / tm)
             for g in range(groups) if edges[g + 1] > edges[g])


def test_xla_ragged_dot_kernel_counts_live_tiles_and_its_weight_gradient_every_group(
    one_chip):
  """XLA's TPU kernel for ragged_dot walks a dynamic number of row tiles (its body's
  grid has a dynamic dimension, its metadata the tile ids), so it is counted at the
  tiles the live rows touch; its weight gradient is a masked product over all M rows
  for each of the G groups: G x the dense work, whatever the routing."""
  def fwd(x, w, gs):
    return jax.lax.ragged_dot(x, w, gs)

  def wgrad(x, w, gs, dy):
    return jax.vjp(lambda w: fwd(x, w, gs), w)[1](dy)[0]

  shapes = (((M, K), jnp.bfloat16), ((G, K, N), jnp.bfloat16), ((G,), jnp.int32))
  h = _compile(fwd, one_chip, *shapes)
  (name, cls, executed, at_most), = hlo_work.executed_work(h, live_rows=M).kernels
  assert cls == "routed_experts"
  kernel, = [i for instrs in h.comps.values() for i in instrs if i.name == name]
  tm, tk, tn = (int(v) for v in re.search(r'ragged_dot_tiling="([\d,]+)"', kernel.line)
                .group(1).split(","))
  padded_n = math.ceil(N / tn) * tn   # the kernel's n tiles cover N
  for live in (M, M // 2, 300):
    w = hlo_work.executed_work(h, live_rows=live)
    want = _tiles(live, G, tm) * tm * padded_n * K * 2
    assert w.flops["routed_experts"] == pytest.approx(want), live
  assert at_most == (M // tm + G - 1) * tm * padded_n * K * 2
  g = hlo_work.executed_work(_compile(wgrad, one_chip, *shapes, ((M, N), jnp.bfloat16)),
                        live_rows=M // 4)
  assert g.flops["routed_experts"] == pytest.approx(G * 2 * M * K * N)


def test_megablox_counts_live_tiles_forward_and_backward(one_chip):
  """megablox's gmm and its VJP's tgmm (weight gradient) both walk one row tile per
  (group, tile it touches): 2 x tm x K x N each, for 4 tiles when the live rows fill
  the 4 groups (one 512-row tile each) or half of them (groups of 256 share tiles but
  each group runs its own), 6 at 1,536 rows (groups of 384 straddle tile edges)."""
  from deepseek_jax.model import dispatch

  def loss(x, w, gs):
    return jnp.sum(dispatch.grouped_matmul(x, w, gs, "megablox").astype(jnp.float32) ** 2)

  mesh = Mesh(np.array(tpu.topology_devices("v5p:2x2x1")[:1]), ("d",))
  args = [jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, PS()))
          for s, dt in (((M, K), jnp.bfloat16), ((G, K, N), jnp.bfloat16),
                        ((G,), jnp.int32))]
  with jax.set_mesh(mesh):     # the TPU program: megablox's kernels, not ragged_dot
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
  h = hlo.read_hlo(text)
  tm = dispatch.megablox_tiling(M, K, N, G)[0]
  assert M % tm == 0 and M // tm >= 4
  assert tm == 512
  for live, tiles in ((M, 4), (M // 2, 4), (1536, 6)):
    assert _tiles(live, G, tm) == tiles
    w = hlo_work.executed_work(h, live_rows=live)
    # forward, input gradient, weight gradient
    assert len(w.kernels) == 3
    assert w.flops["routed_experts"] == pytest.approx(3 * tiles * 2 * tm * K * N), live


def test_conv_flops_count_valid_window_positions():
  """A dot written as a convolution with a dilated window (XLA's per-group masked
  product): each output element multiplies the input features once per valid tap."""
  text = """HloModule m

ENTRY %main (a: bf16[4,512,64], b: bf16[4,512,128]) -> bf16[4,64,128] {
  %a = bf16[4,512,64]{2,1,0} parameter(0)
  %b = bf16[4,512,128]{2,1,0} parameter(1)
  ROOT %c = bf16[4,64,128]{2,1,0} convolution(%a, %b), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0fb_0io->0bf
}
"""
  w = hlo_work.executed_work(hlo.read_hlo(text))
  assert w.total_flops == 2 * 4 * 512 * 64 * 128


def test_classes_follow_op_names():
  flop_class = hlo_work.flop_class
  assert flop_class("jit(s)/jvp(T)/moe_layers/block/block._ffn/moe/shard_map/"
                    "ragged_dot_general/ragged-dot-none", kernel=True) == "routed_experts"
  assert flop_class("ragged-dot-none", kernel=True) == "routed_experts"
  assert flop_class("jit(s)/jvp(T)/moe_layers/block/block._ffn/moe/dot_general") == "other"
  assert flop_class("jit(s)/jvp(T)/layer/block._ffn/moe/shared/abc,cd->abd/dot_general") \
      == "other"
  assert flop_class("jit(s)/jvp(T)/dense_layers/block/attn/attn.queries/x") == "attention"
  assert flop_class("jit(s)/transpose(jvp(T))/moe_layers/checkpoint/"
                    "rematted_computation/block/attn/x") == "attention/recompute"
