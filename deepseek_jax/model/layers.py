"""Small building blocks: parameters with logical axes, RMSNorm, SwiGLU, RoPE with YaRN.

Shape letters used across the library (one alphabet, in names and einsums):
  B batch, T query length, S key length, X flattened tokens (B*T), D d_model,
  N heads, H qk nope head dim, P qk rope head dim, O v head dim, Q q-latent rank,
  R kv-latent rank, F ffn width, E routed experts, K top-k, G expert groups,
  C slots per expert, V vocab, L routed layers; in the routed-expert dispatch
  (dispatch.py) A assignments (X*K) and M rows of a sorted dispatch buffer.

Every weight is created by `param` with a tuple of logical axis names, one per dim;
model/partitioning.py maps those names to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from deepseek_jax.model.config import ModelConfig, yarn_mscale
from deepseek_jax.model.partitioning import CONTEXT, axis_size, constrain, gathered


def param(module: nn.Module, name: str, shape, axes, cfg: ModelConfig, init=None,
          gather: bool = True):
  """A weight of `shape` with logical `axes`, N(0, init_std) unless `init` is given.
  Under context parallelism it comes back gathered over its storage axes
  (partitioning.gathered) unless gather is False."""
  assert len(shape) == len(axes), (name, shape, axes)
  init = init or nn.initializers.normal(stddev=cfg.init_std)
  w = module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape),
                   cfg.jnp_param_dtype)
  return gathered(w, axes) if gather and axis_size(CONTEXT) > 1 else w


def target_platform() -> str:
  """The platform the program being traced is built for: the context mesh's devices
  (jax.set_mesh; abstract TPU devices when train/aot.py compiles a pod program on a CPU
  host), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def flat_matmuls() -> bool:
  """Whether `linear` multiplies as one 2-D matmul (XLA:CPU) or as a dot_general over
  the original dims (every other backend, and CPU under context parallelism: merging a
  batch dim split over the batch axes with a length split over "context" made the SPMD
  partitioner all-gather the batch)."""
  return target_platform() == "cpu" and axis_size(CONTEXT) == 1


def linear(x, w, n_in: int = 1, preferred_element_type=None):
  """x [..., I] . w [I, ...O] -> [..., ...O]: the last n_in dims of x against the first
  n_in of w (the einsum "BTI,IO->BTO").

  Two layouts of the same product, chosen by the platform the program is built for
  (`flat_matmuls`):
    XLA:CPU   ONE 2-D matmul [tokens, I] x [I, O], leading dims flattened into rows: the
              3-D einsum's weight gradient (a contraction over both B and T) goes through
              inserted transposes there; a SwiGLU of width 1024 on 8 x 256 tokens took
              161 ms forward+backward as 3-D einsums and 83 ms flattened
              (docs/history.md, "reach XLA's ceiling", item 1).
    TPU/GPU   an einsum over the original dims. Flattening [B, T] into rows merges a
              sharded dim with an unsharded one, and the SPMD partitioner then loses the
              batch sharding of the f32 logits: the 671B train step on v5p:8x8x8 needs
              227.1 GiB per chip instead of 64.8 (docs/history.md, "the pod fit lost
              and restored").
  """
  lead, inner = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  if tuple(w.shape[:n_in]) != tuple(inner):
    raise ValueError(f"linear: x {x.shape} and w {w.shape} differ in the {n_in} "
                     "contracted dim(s)")
  out = w.shape[n_in:]
  if not flat_matmuls():
    letters = "abcdefghijklmnopqrstuvwxyz"
    a, i, o = (letters[:len(lead)], letters[len(lead):x.ndim],
               letters[x.ndim:x.ndim + len(out)])
    return jnp.einsum(f"{a}{i},{i}{o}->{a}{o}", x, w,
                      preferred_element_type=preferred_element_type)
  y = jnp.dot(x.reshape(-1, int(np.prod(inner))), w.reshape(int(np.prod(inner)), -1),
              preferred_element_type=preferred_element_type)
  return y.reshape(lead + out)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 and cast back (as HF and the official code)."""
  cfg: ModelConfig
  axis_name: str = "norm"
  eps: float | None = None   # None: cfg.rms_eps

  @nn.compact
  def __call__(self, x):
    scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), self.cfg,
                  init=nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    eps = self.cfg.rms_eps if self.eps is None else self.eps
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


class SwiGLU(nn.Module):
  """down(silu(x @ gate) * (x @ up)): the dense FFN and the shared experts."""
  cfg: ModelConfig
  width: int

  @nn.compact
  def __call__(self, x_BTD):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    D, F = cfg.d_model, self.width
    w_gate = param(self, "w_gate", (D, F), ("embed", "mlp"), cfg)
    w_up = param(self, "w_up", (D, F), ("embed", "mlp"), cfg)
    w_down = param(self, "w_down", (F, D), ("mlp", "embed"), cfg)
    x = x_BTD.astype(dt)
    h_BTF = nn.silu(linear(x, w_gate.astype(dt))) * linear(x, w_up.astype(dt))
    if h_BTF.ndim == 3 and axis_size(CONTEXT) > 1:
      # Left free under context parallelism, the SPMD partitioner gathered the whole
      # sequence's hidden ([1, 131072, 18432] for V3's dense layers at 128K).
      h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
    return linear(h_BTF, w_down.astype(dt))


# RoPE ------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies of the P/2 rotated pairs, with YaRN's correction when on.

  YaRN (V3 Sec. 4.3) keeps the high-frequency dims (many rotations within the original
  context: extrapolate) and divides the low-frequency ones by the factor (interpolate),
  with a linear ramp between the dims that make beta_fast and beta_slow rotations.
  """
  P = cfg.qk_rope_head_dim
  base = cfg.rope_theta
  inv_freq = 1.0 / (base ** (np.arange(0, P, 2, dtype=np.float64) / P))
  if not cfg.yarn:
    return inv_freq.astype(np.float32)

  def correction_dim(n_rot):
    return P * np.log(cfg.rope_original_max_len / (n_rot * 2 * np.pi)) / (2 * np.log(base))

  low = max(np.floor(correction_dim(cfg.beta_fast)), 0)
  high = min(np.ceil(correction_dim(cfg.beta_slow)), P - 1)
  if low == high:
    high += 0.001  # avoids 0/0, as the reference implementations do
  ramp = np.clip((np.arange(P // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  extrapolate = 1.0 - ramp
  inv_freq = inv_freq / cfg.rope_factor * (1.0 - extrapolate) + inv_freq * extrapolate
  return inv_freq.astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
  """YaRN's factor on cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim).

  It is 1 for V3 (mscale == mscale_all_dim == 1); HF applies it to cos and sin, the
  official code has no such term (it only exists when the two mscales differ).
  """
  if not cfg.yarn:
    return 1.0
  if cfg.mscale and cfg.mscale_all_dim:
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor,
                                                                    cfg.mscale_all_dim)
  return yarn_mscale(cfg.rope_factor, 1.0)


def softmax_scale(cfg: ModelConfig) -> float:
  """1/sqrt(H + P), times mscale(s, mscale_all_dim)^2 under YaRN (V3 Sec. 4.3)."""
  scale = cfg.qk_head_dim ** -0.5
  if cfg.yarn and cfg.mscale_all_dim:
    scale *= yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
  return scale


def apply_rope(x, positions, cfg: ModelConfig):
  """Rotates ADJACENT pairs (0,1), (2,3), ... of the last dim, as DeepSeek's code does.

  x: [B, T, ..., P]; positions: [B, T] integer positions. Computed in float32.
  """
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  angle_BTp = positions.astype(jnp.float32)[..., None] * inv_freq
  factor = rope_attention_factor(cfg)
  cos, sin = jnp.cos(angle_BTp) * factor, jnp.sin(angle_BTp) * factor
  extra = x.ndim - 3  # head dims between T and P
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  x0, x1 = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
