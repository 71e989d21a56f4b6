"""Independent, slow references in plain numpy (float64, explicit loops).

Nothing here calls deepseek_jax: a ModelConfig is only read for its numbers. Each function
follows the DeepSeek-V3 report and the official `inference/model.py` (RoPE on adjacent
pairs via complex numbers, YaRN correction range with floor/ceil, group-limited routing),
plus Hugging Face's YaRN attention factor mscale(s, mscale) / mscale(s, mscale_all_dim).
"""

from __future__ import annotations

import math

import jax
import numpy as np


def f64(x):
  return np.asarray(x, dtype=np.float64)


# Parameters -----------------------------------------------------------------------

def randomize(tree, seed, std=0.2, embed_std=1.0):
  """A numpy tree shaped like `tree` (arrays or ShapeDtypeStructs) of random values that
  give O(1) activations: norm scales near 1, the embedding N(0, embed_std), every other
  weight N(0, std). The library's own init (std 0.006-0.05) makes attention nearly
  uniform and routing nearly tied."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(leaf.shape)
    if name == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name == "embed":
      value = embed_std * rng.standard_normal(shape)
    else:
      value = std * rng.standard_normal(shape)
    return value.astype(np.dtype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(fill, tree)


# Norms and FFN ------------------------------------------------------------------

def rms_norm(x, scale, eps):
  x = f64(x)
  out = np.empty_like(x)
  flat_in, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
  for r in range(flat_in.shape[0]):
    row = flat_in[r]
    flat_out[r] = row / math.sqrt(float(np.sum(row * row)) / row.size + eps) * f64(scale)
  return out


def silu(z):
  return z / (1.0 + np.exp(-z))


def swiglu(x_D, w_gate_DF, w_up_DF, w_down_FD):
  x = f64(x_D)
  return (silu(x @ f64(w_gate_DF)) * (x @ f64(w_up_DF))) @ f64(w_down_FD)


# RoPE and YaRN ---------------------------------------------------------------------

def get_mscale(factor, mscale):
  return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq(cfg):
  """Official DeepSeek-V3 precompute_freqs_cis (minus the seqlen test): 1/theta^(2i/P),
  then YaRN's blend of interpolated and extrapolated frequencies when factor > 1."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  freqs = [1.0 / base ** (2 * i / dim) for i in range(dim // 2)]
  if cfg.rope_factor <= 1.0:
    return np.array(freqs)

  def find_correction_dim(num_rotations):
    return (dim * math.log(cfg.rope_original_max_len / (num_rotations * 2 * math.pi))
            / (2 * math.log(base)))

  def find_correction_range(low_rot, high_rot):
    low = math.floor(find_correction_dim(low_rot))
    high = math.ceil(find_correction_dim(high_rot))
    return max(low, 0), min(high, dim - 1)

  low, high = find_correction_range(cfg.beta_fast, cfg.beta_slow)
  if low == high:
    high += 0.001
  out = []
  for i, f in enumerate(freqs):
    ramp = min(max((i - low) / (high - low), 0.0), 1.0)
    smooth = 1.0 - ramp
    out.append(f / cfg.rope_factor * (1.0 - smooth) + f * smooth)
  return np.array(out)


def rope_attention_factor(cfg):
  """HF's YaRN factor on cos and sin (1 without YaRN, and for V3's equal mscales)."""
  if cfg.rope_factor <= 1.0:
    return 1.0
  if cfg.mscale and cfg.mscale_all_dim:
    return get_mscale(cfg.rope_factor, cfg.mscale) / get_mscale(cfg.rope_factor,
                                                                cfg.mscale_all_dim)
  return get_mscale(cfg.rope_factor, 1.0)


def softmax_scale(cfg):
  scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
  if cfg.rope_factor > 1.0 and cfg.mscale_all_dim:
    scale *= get_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
  return scale


def rope(x, positions_BT, freqs, attention_factor=1.0):
  """x [B, T, ..., P]: view adjacent pairs as complex numbers, multiply by
  attention_factor * exp(i * pos * freq), view back (official apply_rotary_emb)."""
  x = f64(x)
  B, T = x.shape[:2]
  out = np.empty_like(x)
  for b in range(B):
    for t in range(T):
      z = np.ascontiguousarray(x[b, t]).reshape(x.shape[2:-1] + (-1, 2)).view(np.complex128)
      z = z[..., 0]
      rot = attention_factor * np.exp(1j * float(positions_BT[b, t]) * f64(freqs))
      out[b, t] = np.stack([(z * rot).real, (z * rot).imag], axis=-1).reshape(x.shape[2:])
  return out


# Multi-head latent attention ---------------------------------------------------------

# The official code builds q_norm and kv_norm with RMSNorm's default eps (1e-6), and HF
# DeepseekV3 does too, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


def mla(p, x_BTD, pos_BT, cfg, segment_ids_BT=None):
  """Naive MLA: per token projections, then per batch row, head and query a softmax over
  the allowed keys (s <= t, same document)."""
  x = f64(x_BTD)
  B, T, _ = x.shape
  N, O = cfg.n_heads, cfg.v_head_dim
  freqs, factor, scale = inv_freq(cfg), rope_attention_factor(cfg), softmax_scale(cfg)
  p = {k: (v if isinstance(v, dict) else f64(v)) for k, v in p.items()}

  if cfg.q_lora_rank is None:
    q_nope = np.einsum("btd,dnh->btnh", x, p["w_q_nope"])
    q_rope = np.einsum("btd,dnp->btnp", x, p["w_q_rope"])
  else:
    c_q = rms_norm(x @ p["w_dq"], p["q_norm"]["scale"], LATENT_NORM_EPS)
    q_nope = np.einsum("btq,qnh->btnh", c_q, p["w_uq"])
    q_rope = np.einsum("btq,qnp->btnp", c_q, p["w_qr"])
  q_rope = rope(q_rope, pos_BT, freqs, factor)
  c_kv = rms_norm(x @ p["w_dkv"], p["kv_norm"]["scale"], LATENT_NORM_EPS)
  k_rope = rope(x @ p["w_kr"], pos_BT, freqs, factor)

  out = np.zeros_like(x)
  for b in range(B):
    for n in range(N):
      k_nope = c_kv[b] @ p["w_uk"][:, n, :]      # [T, H]
      v = c_kv[b] @ p["w_uv"][:, n, :]           # [T, O]
      for t in range(T):
        keys = [s for s in range(T) if s <= t and (
            segment_ids_BT is None or segment_ids_BT[b, s] == segment_ids_BT[b, t])]
        scores = np.array([
            (q_nope[b, t, n] @ k_nope[s] + q_rope[b, t, n] @ k_rope[b, s]) * scale
            for s in keys])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        o = np.zeros(O)
        for s, w in zip(keys, probs):
          o += w * v[s]
        out[b, t] += o @ p["w_o"][n]
  return out


# Routing -----------------------------------------------------------------------

def affinities(logits_XE, score_func):
  z = f64(logits_XE)
  if score_func == "sigmoid":
    return 1.0 / (1.0 + np.exp(-z))
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def select(scores_E, bias_E, n_group, topk_group, top_k, bias_mode="add"):
  """Chosen experts of ONE token, best first: group-limited top-k of scores + bias
  (bias_mode "add") or scores * bias ("mul")."""
  E = len(scores_E)
  if bias_mode == "mul":
    choice = [float(scores_E[e]) * float(bias_E[e]) for e in range(E)]
  else:
    choice = [float(scores_E[e]) + float(bias_E[e]) for e in range(E)]
  if n_group > 1:
    per = E // n_group
    group_score = []
    for g in range(n_group):
      members = sorted(choice[g * per:(g + 1) * per], reverse=True)
      group_score.append(members[0] + members[1])
    kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    for e in range(E):
      if e // per not in kept:
        choice[e] = -math.inf
  return sorted(range(E), key=lambda e: -choice[e])[:top_k]


def gates(scores_E, chosen, norm_topk_prob, routed_scaling_factor):
  g = [float(scores_E[e]) for e in chosen]
  if norm_topk_prob:
    total = sum(g)
    g = [v / total for v in g]
  return [v * routed_scaling_factor for v in g]


def route(scores_XE, bias_E, cfg):
  """(chosen [X][K], gates [X][K]) with explicit per-token loops."""
  chosen, gate = [], []
  for x in range(len(scores_XE)):
    c = select(scores_XE[x], bias_E, cfg.n_group, cfg.topk_group, cfg.top_k, cfg.bias_mode)
    chosen.append(c)
    gate.append(gates(scores_XE[x], c, cfg.norm_topk_prob, cfg.routed_scaling_factor))
  return chosen, gate


# DeepSeekMoE ---------------------------------------------------------------------

def moe(p, u_BTD, bias_E, cfg, valid_BT=None, capacity=None):
  """Routed + shared experts of a MoE layer, token by token (flattened in B, T order).

  capacity: slots per expert; assignments past them (in token order) are dropped.
  Returns (y [B,T,D], stats dict with load_E, aux_count_BE, aux_prob_BE, aux_score_BE,
  n_tokens_B, dropped, and the affinities scores_XE with their valid_X)."""
  u = f64(u_BTD)
  B, T, D = u.shape
  E = cfg.n_routed_experts
  valid = np.ones((B, T), bool) if valid_BT is None else np.asarray(valid_BT, bool)
  u_XD, valid_X = u.reshape(B * T, D), valid.reshape(B * T)
  scores_XE = affinities(u_XD @ f64(p["w_router"]), cfg.score_func)
  chosen, gate = route(scores_XE, f64(bias_E), cfg)
  # The balance losses' routing map (V3 eq. 18): plain top-K of the unbiased scores over
  # all experts.
  plain = [select(scores_XE[x], np.zeros(E), 1, 1, cfg.top_k)
           for x in range(len(scores_XE))]

  y = np.zeros((B * T, D))
  used = [0] * E
  load = np.zeros(E)
  dropped = 0
  aux_count = np.zeros((B, E))
  aux_prob = np.zeros((B, E))
  aux_score = np.zeros((B, E))
  for x in range(B * T):
    b = x // T
    if cfg.n_shared_experts:
      y[x] += swiglu(u_XD[x], p["shared"]["w_gate"], p["shared"]["w_up"],
                     p["shared"]["w_down"])
    if not valid_X[x]:
      continue
    for e, g in zip(chosen[x], gate[x]):
      load[e] += 1
      used[e] += 1
      if capacity is not None and used[e] > capacity:
        dropped += 1
        continue
      y[x] += g * swiglu(u_XD[x], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    for e in plain[x]:
      aux_count[b, e] += 1
    aux_prob[b] += scores_XE[x] / scores_XE[x].sum()
    aux_score[b] += scores_XE[x]
  stats = dict(load_E=load, aux_count_BE=aux_count, aux_prob_BE=aux_prob, aux_score_BE=aux_score,
               n_tokens_B=valid.sum(1).astype(np.float64), dropped=float(dropped),
               scores_XE=scores_XE, valid_X=valid_X)
  return y.reshape(B, T, D), stats


# The whole model -------------------------------------------------------------------

def block(p, x_BTD, pos_BT, seg_BT, valid_BT, bias_E, cfg, moe_layer, stats=None):
  """One decoder block; a MoE block appends its routing stats to `stats` if given."""
  x = f64(x_BTD) + mla(p["attn"], rms_norm(x_BTD, p["attn_norm"]["scale"], cfg.rms_eps),
                       pos_BT, cfg, seg_BT)
  h = rms_norm(x, p["ffn_norm"]["scale"], cfg.rms_eps)
  if moe_layer:
    y, s = moe(p["moe"], h, bias_E, cfg, valid_BT)
    if stats is not None:
      stats.append(s)
  else:
    f = p["ffn"]
    y = np.stack([[swiglu(h[b, t], f["w_gate"], f["w_up"], f["w_down"])
                   for t in range(h.shape[1])] for b in range(h.shape[0])])
  return x + y


def transformer(params, bias_LE, tokens_BT, cfg, segment_ids_BT=None, stats=None):
  """(logits [B,T,V], mtp logits [D_mtp,B,T,V]): embedding, blocks, final norm, head;
  MTP module k reads [norm(Emb(t[i+k])) ; norm(h_{k-1}[i])] (embedding first).
  stats: a list that receives each routed layer's moe() stats, main layers then MTP."""
  tokens = np.asarray(tokens_BT)
  B, T = tokens.shape
  pos = np.broadcast_to(np.arange(T), (B, T))
  valid = np.ones((B, T), bool) if segment_ids_BT is None else np.asarray(segment_ids_BT) != 0
  embed = f64(params["embed"])
  head = embed.T if cfg.tie_embeddings else f64(params["head"])
  x = embed[tokens]
  row = 0
  for i in range(cfg.n_layers):
    moe_layer = i >= cfg.first_k_dense
    x = block(params[f"layer_{i}"], x, pos, segment_ids_BT, valid,
              bias_LE[row] if moe_layer else None, cfg, moe_layer, stats)
    row += int(moe_layer)
  normed = rms_norm(x, params["final_norm"]["scale"], cfg.rms_eps)
  logits = normed @ head

  # h_0: the last hidden state before the final norm (eq. 21), or after it with
  # mtp_feed_normed (HF / vLLM), each module then passing on its own normed output.
  feed_normed = getattr(cfg, "mtp_feed_normed", False)
  mtp_logits = []
  h = normed if feed_normed else x
  for k in range(1, cfg.mtp_depth + 1):
    p = params[f"mtp_{k - 1}"]
    ahead = np.zeros_like(tokens)
    ahead[:, :T - k] = tokens[:, k:]
    valid_k = np.zeros((B, T), bool)
    for b in range(B):
      for i in range(T - k):
        valid_k[b, i] = valid[b, i] and valid[b, i + k] and (
            segment_ids_BT is None or segment_ids_BT[b, i + k] == segment_ids_BT[b, i])
    e = rms_norm(embed[ahead], p["enorm"]["scale"], cfg.rms_eps)
    hn = rms_norm(h, p["hnorm"]["scale"], cfg.rms_eps)
    x_k = np.concatenate([e, hn], -1) @ f64(p["w_proj"])
    moe_layer = cfg.n_layers > cfg.first_k_dense
    h = block(p["block"], x_k, pos, segment_ids_BT, valid_k,
              bias_LE[row] if moe_layer else None, cfg, moe_layer, stats)
    row += int(moe_layer)
    h_normed = rms_norm(h, p["final_norm"]["scale"], cfg.rms_eps)
    mtp_logits.append(h_normed @ head)
    if feed_normed:
      h = h_normed
  return logits, (np.stack(mtp_logits) if mtp_logits else None)


# Losses ------------------------------------------------------------------------

def cross_entropy(logits_BTV, targets_BT, weights_BT):
  logits = f64(logits_BTV)
  total, weight = 0.0, 0.0
  B, T, _ = logits.shape
  for b in range(B):
    for t in range(T):
      row = logits[b, t]
      logz = row.max() + math.log(np.exp(row - row.max()).sum())
      total += float(weights_BT[b, t]) * (logz - row[targets_BT[b, t]])
      weight += float(weights_BT[b, t])
  return total, weight


def depth_targets(tokens_BT1, segments_BT1, k):
  """Position i of a row of T+1 tokens predicts token i+k+1 when it exists and lies in
  the same (non-padding) document as token i."""
  tokens = np.asarray(tokens_BT1)
  B, T = tokens.shape[0], tokens.shape[1] - 1
  targets = np.zeros((B, T), np.int64)
  weights = np.zeros((B, T), bool)
  for b in range(B):
    for i in range(T):
      j = i + k + 1
      if j > T:
        continue
      targets[b, i] = tokens[b, j]
      if segments_BT1 is None:
        weights[b, i] = True
      else:
        s = segments_BT1[b]
        weights[b, i] = s[i] != 0 and s[j] == s[i]
  return targets, weights


def lm_loss(logits_BTV, mtp_logits_DBTV, tokens_BT1, segments_BT1, mtp_lambda):
  """(ce, [L_1..L_D], total = ce + lambda / D * sum_k L_k)."""
  def mean_ce(logits, k):
    t, w = depth_targets(tokens_BT1, segments_BT1, k)
    s, n = cross_entropy(logits, t, w)
    return s / max(n, 1.0)

  ce = mean_ce(logits_BTV, 0)
  depth = [mean_ce(mtp_logits_DBTV[k - 1], k) for k in range(1, len(mtp_logits_DBTV) + 1)]
  return ce, depth, ce + mtp_lambda / len(depth) * sum(depth)


# Quantile Balancing ----------------------------------------------------------------

def quantile_target(scores_XE, bias_E, valid_X, top_k):
  """QB's bias target, token by token and expert by expert (selection by s + b).

  alpha_t: the (K+1)-th largest s_tj + b_j; expert j needs r_tj = alpha_t - s_tj to be
  picked by token t; target_j: the (q+1)-th smallest r_tj over valid tokens,
  q = floor(n_valid K / E); then centred."""
  s = f64(scores_XE)
  X, E = s.shape
  rows = [x for x in range(X) if valid_X[x]]
  q = int(math.floor(len(rows) * top_k / E))
  alpha = {x: sorted((s[x, j] + float(bias_E[j]) for j in range(E)), reverse=True)[top_k]
           for x in rows}
  target = np.array([sorted(alpha[x] - s[x, j] for x in rows)[q] for j in range(E)])
  return target - target.mean()
