"""Language-model losses: next-token cross-entropy and the MTP loss (V3 eqs 24-25).

A batch row holds T+1 tokens (`tokens_BT1`): the model reads the first T, and depth k
(0 = the main head) at position i predicts token i+k+1. A target counts only if it exists
and neither it nor position i is padding (segment id 0). With `same_document` (the
default, and the ablation's choice with its document attention mask) it must also lie in
the same packed document as position i, so no prediction crosses a document boundary;
without it (V3's packing: no cross-sample masking) the end-of-document -> next-document
transition is trained like any other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.model.transformer import ModelOutput
from deepseek_jax.model.mtp import shift_left


def token_losses(logits_BTV, targets_BT):
  """-log p(target) of every position [B, T], in float32."""
  logits = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits, axis=-1)
  picked_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return logz_BT - picked_BT


def cross_entropy(logits_BTV, targets_BT, weights_BT):
  """(sum of weighted token losses, sum of weights), in float32."""
  w = weights_BT.astype(jnp.float32)
  return jnp.sum(token_losses(logits_BTV, targets_BT) * w), jnp.sum(w)


def depth_targets(tokens_BT1, segments_BT1, k, same_document: bool = True):
  """(targets [B,T], weights [B,T]) for depth k: token i+k+1, neither it nor token i
  padding, and (same_document) in token i's document."""
  T = tokens_BT1.shape[1] - 1
  targets_BT = shift_left(tokens_BT1[:, 1:], k)
  in_range = jnp.arange(T) + k < T
  weights_BT = jnp.broadcast_to(in_range, targets_BT.shape)
  if segments_BT1 is not None:
    seg_BT = segments_BT1[:, :-1]
    target_seg_BT = shift_left(segments_BT1[:, 1:], k)
    weights_BT = weights_BT & (seg_BT != 0) & (target_seg_BT != 0)
    if same_document:
      weights_BT = weights_BT & (target_seg_BT == seg_BT)
  return targets_BT, weights_BT


def lm_losses(out: ModelOutput, tokens_BT1, segments_BT1=None, mtp_lambda: float = 0.3,
              same_document: bool = True):
  """{"ce": main loss, "mtp": [D] per-depth losses, "mtp_total": (lambda/D) sum_k L_k,
  "loss": ce + mtp_total, "n_tokens": targets of the main head}."""
  targets, weights = depth_targets(tokens_BT1, segments_BT1, 0, same_document)
  ce_sum, n = cross_entropy(out.logits, targets, weights)
  ce = ce_sum / jnp.maximum(n, 1.0)
  result = {"ce": ce, "n_tokens": n, "loss": ce}
  if out.mtp_logits is not None:
    depth_losses = []
    for k in range(1, out.mtp_logits.shape[0] + 1):
      targets, weights = depth_targets(tokens_BT1, segments_BT1, k, same_document)
      s, m = cross_entropy(out.mtp_logits[k - 1], targets, weights)
      depth_losses.append(s / jnp.maximum(m, 1.0))
    mtp = jnp.stack(depth_losses)
    result["mtp"] = mtp
    result["mtp_total"] = mtp_lambda * jnp.mean(mtp)
    result["loss"] = ce + result["mtp_total"]
  return result


def sequence_sums(out: ModelOutput, tokens_BT1, segments_BT1=None,
                  same_document: bool = True):
  """Per sequence, nothing summed over the batch (evaluation reduces once, at the end):
  {"ce_sum" [B], "n_tokens" [B]} of the main head and, with MTP, {"mtp_sum",
  "mtp_tokens"} [B, D] of each depth (its own targets: fewer than the main head's)."""
  def sums(logits_BTV, k):
    targets, weights = depth_targets(tokens_BT1, segments_BT1, k, same_document)
    w = weights.astype(jnp.float32)
    return (token_losses(logits_BTV, targets) * w).sum(-1), w.sum(-1)

  result = dict(zip(("ce_sum", "n_tokens"), sums(out.logits, 0)))
  if out.mtp_logits is not None:
    depth = [sums(out.mtp_logits[k - 1], k) for k in range(1, out.mtp_logits.shape[0] + 1)]
    result["mtp_sum"] = jnp.stack([s for s, _ in depth], axis=-1)
    result["mtp_tokens"] = jnp.stack([n for _, n in depth], axis=-1)
  return result
