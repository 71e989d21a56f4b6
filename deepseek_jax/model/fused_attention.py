"""Fused (flash) attention for GPUs: MLA's training attention through a library kernel.

Two libraries, chosen by ModelConfig.attention_impl:
  "cudnn"    jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's flash
             attention. It needs equal query/key and value head dims, and MLA's differ
             (K = H + P = 192 against O = 128 in V3), so V is zero-padded to K and the
             output sliced back to O (the padded columns of P.V are exactly zero).
  "tokamax"  tokamax.dot_product_attention: value head dims other than K natively; on a
             Hopper GPU its Mosaic GPU flash kernel, on CPU its XLA reference.

Both are causal on the token index (training's queries and keys are the same T tokens)
and honour packed documents (segment ids) through a boolean [B, 1, T, S] mask: a
document-masked run reads that mask in the kernel (cuDNN turns it into an additive
bias), the unmasked run (V3's packing, the GPU config) passes none and gets the
kernel's own causal skip. `implementation` is the library's own switch: the model
passes the GPU kernel's name, the tests pass "xla" to check the masking and padding on
CPU through the same API.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

LIBRARIES = ("cudnn", "tokamax")


def import_tokamax():
  """tokamax (the cuda extra; imported only when a tokamax path runs). It reads its
  options from absl flags and, where no absl program parsed them yet (a notebook,
  pytest), parses sys.argv itself and fails on the host program's arguments: the
  defaults are marked parsed first, as absl's app.run would leave them."""
  from absl import flags
  import tokamax
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def _cudnn_or_xla() -> str:
  if jax.default_backend() == "gpu":
    return "cudnn"
  global _WARNED
  if not _WARNED:
    logging.warning("attention_impl='cudnn' on the %s backend: jax.nn's XLA attention "
                    "instead (same math, no fused kernel)", jax.default_backend())
    _WARNED = True
  return "xla"


_WARNED = False


def document_mask(seg_BT, seg_BS):
  """[B, 1, T, S] bool: the key is in the query's packed document (causality apart)."""
  return (seg_BT[:, :, None] == seg_BS[:, None, :])[:, None]


def fused_attention(q_BTNK, k_BSNK, v_BSNO, seg_BT=None, *, library: str,
                    implementation: str | None = None):
  """softmax(q . k^T, causal, same document) . v -> [B, T, N, O] in v's dtype.

  q carries the softmax scale already (MLA.expand), so the kernels get scale 1.
  implementation None picks the library's GPU kernel: cuDNN's on a GPU backend, else
  jax.nn's XLA path (the same math: so a "cudnn" config still initialises, counts its
  parameters and runs on a CPU, logged once); tokamax's own choice (Mosaic GPU on
  Hopper, its XLA path on CPU). "xla" runs the library's XLA path on any backend.
  """
  if library not in LIBRARIES:
    raise ValueError(f"unknown fused attention library {library!r}; known: {LIBRARIES}")
  O, K = v_BSNO.shape[-1], k_BSNK.shape[-1]
  mask = None if seg_BT is None else document_mask(seg_BT, seg_BT)
  if library == "cudnn":
    if O > K:
      raise ValueError(f"value head dim {O} exceeds the qk head dim {K}: cuDNN's attention "
                       "needs them equal and only V is padded here")
    v_BSNK = jnp.pad(v_BSNO, [(0, 0)] * 3 + [(0, K - O)])
    o_BTNK = jax.nn.dot_product_attention(
        q_BTNK, k_BSNK, v_BSNK, mask=mask, scale=1.0, is_causal=True,
        implementation=implementation or _cudnn_or_xla())
    return o_BTNK[..., :O]
  return import_tokamax().dot_product_attention(q_BTNK, k_BSNK, v_BSNO, mask=mask, scale=1.0,
                                       is_causal=True, implementation=implementation)
