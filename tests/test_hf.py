"""deepseek_jax.hf against Hugging Face's DeepseekV3ForCausalLM, logit for logit.

Random tiny HF models (weights re-drawn with a large std so that routing and mixing are
far from trivial) are saved in the three file layouts (per-expert tensors as
save_pretrained writes them, fused experts, sharded with an index), loaded with
hf.load_checkpoint and run next to the PyTorch model on the same tokens. The config
mapping, which needs no torch, is tests/test_hf_config.py. Only the tests that run
torch or transformers skip without them (_parity); our own export's round trips and the
loader's errors need safetensors alone.
"""

import functools
import shutil

import numpy as np
import pytest

_WHY = "HF parity tests need the parity extra: pip install -e '.[parity]'"
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason=_WHY)

import jax  # noqa: E402

from deepseek_jax import hf
from deepseek_jax.hf import weights as hf_weights  # noqa: E402
from deepseek_jax.model import config  # noqa: E402
from deepseek_jax.model.transformer import Transformer  # noqa: E402
from test_hf_config import BASE  # noqa: E402  (the tiny HF config both files use)

B, T = 2, 16


def _parity():
  """(torch, transformers), or the calling test skipped when they are not installed."""
  return (pytest.importorskip("torch", reason=_WHY),
          pytest.importorskip("transformers", reason=_WHY))

# name -> (HF config changes, file layout). Yarn cases use original lengths below T.
CASES = {
    "lora-default-interleave": (dict(), "per_expert"),
    "nolora-yarn_mscales-halfsplit": (dict(
        q_lora_rank=None, rope_interleave=False, norm_topk_prob=False, n_group=4,
        topk_group=2, num_experts_per_tok=3, max_position_embeddings=32,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=8, mscale=0.7,
                             mscale_all_dim=0.9)), "fused"),
    "lora-yarn_plain-tied": (dict(
        hidden_size=48, num_attention_heads=3, q_lora_rank=16, num_hidden_layers=2,
        n_group=1, topk_group=1, n_shared_experts=2, tie_word_embeddings=True,
        max_position_embeddings=16, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=2.0,
            original_max_position_embeddings=8)), "sharded"),
    "nolora-default-halfsplit": (dict(
        q_lora_rank=None, rope_interleave=False, qk_rope_head_dim=8, topk_group=2,
        rope_parameters=dict(rope_type="default", rope_theta=500.0)), "per_expert"),
}


def _hf_model(changes, seed=0):
  torch, transformers = _parity()
  kw = {**BASE, **changes}
  kw["num_key_value_heads"] = kw["num_attention_heads"]  # MLA: no kv-head groups
  cfg = transformers.DeepseekV3Config(**kw)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.DeepseekV3ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:  # the router gets a larger std so that the top-k is decisive
        p.normal_(0.0, 0.2 if name.endswith("mlp.gate.weight") else 0.08)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.uniform_(-0.05, 0.05)
  return model


def _fuse_experts(folder):
  """Rewrites per-expert tensors as v5's fused gate_up_proj [E, 2F, D] / down_proj [E, D, F]."""
  f = folder / "model.safetensors"
  tensors = safetensors_numpy.load_file(f)
  out, experts = {}, {}
  for name, x in tensors.items():
    if ".mlp.experts." in name:
      prefix, rest = name.split(".mlp.experts.")
      j, proj = rest.split(".")[:2]
      experts.setdefault(prefix, {})[(int(j), proj)] = x
    else:
      out[name] = x
  for prefix, ws in experts.items():
    E = 1 + max(j for j, _ in ws)
    out[f"{prefix}.mlp.experts.gate_up_proj"] = np.stack(
        [np.concatenate([ws[j, "gate_proj"], ws[j, "up_proj"]]) for j in range(E)])
    out[f"{prefix}.mlp.experts.down_proj"] = np.stack([ws[j, "down_proj"] for j in range(E)])
  safetensors_numpy.save_file(out, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (folder, tokens, HF logits); built once per case."""
  cache = {}

  def get(name):
    torch, _ = _parity()
    if name not in cache:
      changes, layout = CASES[name]
      model = _hf_model(changes)
      folder = tmp_path_factory.mktemp(name)
      model.save_pretrained(folder, max_shard_size="20KB" if layout == "sharded" else "50GB")
      if layout == "fused":
        _fuse_experts(folder)
      tokens = np.random.RandomState(1).randint(0, BASE["vocab_size"], (B, T))
      with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.numpy()
      cache[name] = folder, tokens, logits
    return cache[name]

  return get


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  """One jitted forward per config, shared by the tests (compiles dominate their time)."""
  return jax.jit(Transformer(cfg).apply)


def _close(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  scale = np.abs(theirs).max()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
  return np.abs(ours - theirs).max() / scale


@pytest.mark.parametrize("dispatch", ["dropless", "reference"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf(saved, name, dispatch):
  folder, tokens, theirs = saved(name)
  layout = CASES[name][1]
  files = {p.name for p in folder.iterdir()}
  assert ("model.safetensors.index.json" in files) == (layout == "sharded")
  model, variables = hf.load_checkpoint(folder, moe_dispatch=dispatch)
  assert model.cfg.mtp_depth == 0  # HF declares num_nextn_predict_layers but saves none
  err = _close(_apply(model.cfg)(variables, tokens).logits, theirs)
  print(f"{name} {dispatch}: max relative error {err:.2e}")


def test_save_load_roundtrip_and_hf_reads_our_export(saved, tmp_path):
  torch, transformers = _parity()
  folder, tokens, theirs = saved("nolora-yarn_mscales-halfsplit")
  model, variables = hf.load_checkpoint(folder)
  for fused in (True, False):
    out_dir = tmp_path / f"fused_{fused}"
    hf.save_checkpoint(out_dir, model.cfg, variables, fused_experts=fused)
    model2, variables2 = hf.load_checkpoint(out_dir)
    assert model2.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, variables, variables2)
  # The export is interleaved (rope rows permuted) and HF computes the same logits from it.
  hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(
      out_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    _close(hf_model(torch.tensor(tokens)).logits.numpy(), theirs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Our own export of a random tiny model (no MTP, per-expert tensors as save_pretrained
  writes them): what the loader's casts and errors are checked on, with no torch."""
  cfg = _mtp_cfg().replace(mtp_depth=0)
  folder = tmp_path_factory.mktemp("ours")
  hf.save_checkpoint(folder, cfg, _random_variables(cfg), fused_experts=False)
  return folder


def test_bf16_tensors_are_cast(exported, tmp_path):
  import ml_dtypes
  folder = exported
  shutil.copy(folder / "config.json", tmp_path / "config.json")
  tensors = safetensors_numpy.load_file(folder / "model.safetensors")
  half = {n: x.astype(ml_dtypes.bfloat16 if i % 2 else np.float16)
          for i, (n, x) in enumerate(sorted(tensors.items()))}
  safetensors_numpy.save_file(half, tmp_path / "model.safetensors")
  _, ref = hf.load_checkpoint(folder)
  _, got = hf.load_checkpoint(tmp_path)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(got))
  # Every value went through bf16 or fp16: within their rounding of the fp32 originals.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=4e-3, atol=1e-6), got, ref)
  _, got16 = hf.load_checkpoint(tmp_path, dtype="bfloat16")
  moe = got16["params"]["layer_1"]["moe"]
  assert moe["w_gate"].dtype == ml_dtypes.bfloat16
  assert moe["w_router"].dtype == got16["balance"]["expert_bias"].dtype == np.float32


# Errors ---------------------------------------------------------------------------

def _edit_tensors(src, dst, edit):
  shutil.copytree(src, dst)
  f = dst / "model.safetensors"
  tensors = safetensors_numpy.load_file(f)
  edit(tensors)
  safetensors_numpy.save_file(tensors, f)
  return dst


def test_missing_tensor_is_named(exported, tmp_path):
  folder = exported
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  bad = _edit_tensors(folder, tmp_path / "bad", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"missing tensor.*{name}"):
    hf.load_checkpoint(bad)


def test_unknown_tensor_is_named(exported, tmp_path):
  folder = exported
  name = "model.layers.1.mlp.mystery.weight"
  bad = _edit_tensors(folder, tmp_path / "bad",
                      lambda t: t.update({name: np.zeros((4, 4), np.float32)}))
  with pytest.raises(ValueError, match=f"not used.*{name}"):
    hf.load_checkpoint(bad)


def test_wrong_shape_is_named(exported, tmp_path):
  folder = exported
  name = "model.layers.0.self_attn.o_proj.weight"
  bad = _edit_tensors(folder, tmp_path / "bad", lambda t: t.update({name: t[name].T.copy()}))
  with pytest.raises(ValueError, match=f"wrong shape.*{name}"):
    hf.load_checkpoint(bad)


# MTP ------------------------------------------------------------------------------

def _random_variables(cfg, seed=0):
  """Random variables of the right tree, norms near 1, a small balancing bias."""
  rng = np.random.RandomState(seed)
  flat = {}
  for path, s in hf_weights.expected_leaves(Transformer(cfg)).items():
    if path.endswith("scale"):
      x = 1.0 + 0.1 * rng.randn(*s.shape)
    elif path.startswith(hf_weights.BIAS):
      x = rng.uniform(-0.05, 0.05, s.shape)
    else:
      x = 0.08 * rng.randn(*s.shape)
    flat[path] = x.astype(s.dtype)
  return hf_weights.unflatten_leaves(flat, cfg.n_routed_layers)


def _mtp_cfg():
  return config.tiny().replace(mtp_depth=1, n_group=2, topk_group=1, n_layers=2,
                               mtp_feed_normed=True)


def test_mtp_roundtrip(tmp_path):
  cfg = _mtp_cfg()
  variables = _random_variables(cfg)
  hf.save_checkpoint(tmp_path, cfg, variables, fused_experts=False)
  model, loaded = hf.load_checkpoint(tmp_path)
  assert model.cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, variables, loaded)
  tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (B, T))
  a, b = _apply(cfg)(variables, tokens), _apply(cfg)(loaded, tokens)
  np.testing.assert_array_equal(a.mtp_logits, b.mtp_logits)
  # mtp=False drops the modules and their bias row; the main logits are unchanged.
  small, dropped = hf.load_checkpoint(tmp_path, mtp=False)
  assert small.cfg.mtp_depth == 0 and "mtp_0" not in dropped["params"]
  assert dropped["balance"]["expert_bias"].shape[0] == cfg.n_moe_layers
  np.testing.assert_allclose(_apply(small.cfg)(dropped, tokens).logits, a.logits,
                             rtol=1e-6, atol=1e-6)


def test_mtp_copies_must_equal_the_main_arrays(tmp_path):
  cfg = _mtp_cfg()
  hf.save_checkpoint(tmp_path / "ok", cfg, _random_variables(cfg))
  name = f"model.layers.{cfg.n_layers}.embed_tokens.weight"
  bad = _edit_tensors(tmp_path / "ok", tmp_path / "bad", lambda t: t.update({name: t[name] + 1}))
  with pytest.raises(ValueError, match=f"{name} should be a copy"):
    hf.load_checkpoint(bad)


def _hf_mtp(folder, cfg):
  """HF's own MTP module (transformers >= 5) on our released-layout export."""
  _, transformers = _parity()
  from transformers.modeling_layers import MtpModel
  main = transformers.DeepseekV3ForCausalLM.from_pretrained(
      folder, attn_implementation="eager").eval()
  # HF finds the MTP tensors by the main model's ignore pattern, which names V3's layer 61.
  main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layers}\..*"]
  return main, MtpModel.from_pretrained(main).eval()


def _hf_mtp_logits(mtp, h_BTD, tokens):
  """Depth-1 logits of HF's MTP layer from hidden states h (position i reads token i+1)."""
  torch, _ = _parity()
  pos = torch.arange(1, T)[None].expand(B, -1)
  with torch.no_grad():
    h = mtp.forward_layer(0, torch.tensor(np.asarray(h_BTD))[:, :-1], pos, None,
                          input_ids=torch.tensor(tokens[:, 1:]))
    return mtp._project_to_logits(h).numpy()


@pytest.fixture(scope="module")
def mtp_pair(tmp_path_factory):
  _parity()
  cfg = _mtp_cfg()
  folder = tmp_path_factory.mktemp("mtp")
  variables = _random_variables(cfg, seed=3)
  hf.save_checkpoint(folder, cfg, variables)
  tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (B, T))
  out = _apply(cfg)(variables, tokens)
  main, mtp = _hf_mtp(folder, cfg)
  return cfg, variables, tokens, out, main, mtp


def test_mtp_layout_matches_hf(mtp_pair):
  """The released MTP layout, as HF's MtpModel reads it, computes our MTP module: the
  main logits and the depth-1 logits, HF's MTP layer fed HF's own last hidden state."""
  cfg, variables, tokens, out, main, mtp = mtp_pair
  torch, _ = _parity()
  with torch.no_grad():
    hf_out = main(torch.tensor(tokens), output_hidden_states=True)
  _close(out.logits, hf_out.logits.numpy())
  assert out.mtp_logits.shape[0] == cfg.mtp_depth == 1
  # Position i of depth 1 predicts token i+2; the last position has no token i+1 to read.
  _close(out.mtp_logits[0][:, :-1], _hf_mtp_logits(mtp, hf_out.hidden_states[-1], tokens))


def test_mtp_h0_convention_matches_hf(mtp_pair):
  """Imported checkpoints feed MTP the NORMED last hidden state, as HF and vLLM do; the
  other convention (mtp_feed_normed=False, V3 eq. 21's reading) is HF's MTP layer fed
  the un-normed state, and the two are far enough apart for the tests to tell them."""
  cfg, variables, tokens, out, main, mtp = mtp_pair
  assert cfg.mtp_feed_normed
  raw = _apply(cfg.replace(mtp_feed_normed=False))(variables, tokens)
  np.testing.assert_allclose(raw.logits, out.logits, rtol=1e-6, atol=1e-6)
  _close(raw.mtp_logits[0][:, :-1], _hf_mtp_logits(mtp, raw.hidden, tokens))
  gap = np.abs(np.asarray(raw.mtp_logits[0]) - np.asarray(out.mtp_logits[0])).max()
  assert gap > 1e-2 * np.abs(np.asarray(out.mtp_logits[0])).max()


def test_scanned_layout_loads_matches_hf_and_exports_unrolled(saved, tmp_path):
  """scan_layers=True: the HF tensors stacked per kind, the same logits, and an export
  that is the HF (unrolled) layout again."""
  folder, tokens, theirs = saved("lora-default-interleave")
  model, variables = hf.load_checkpoint(folder, scan_layers=True)
  assert model.cfg.scan_layers and "layer_0" not in variables["params"]
  _close(_apply(model.cfg)(variables, tokens).logits, theirs)
  hf.save_checkpoint(tmp_path, model.cfg, variables)
  model2, variables2 = hf.load_checkpoint(tmp_path)
  assert not model2.cfg.scan_layers and "layer_0" in variables2["params"]
  _close(_apply(model2.cfg)(variables2, tokens).logits, theirs)


def test_export_of_a_trained_scanned_run_loads_in_transformers(tmp_path):
  """experiments.export_hf on a trained tiny run (scanned layers, MTP, bias, byte
  tokenizer), in shards of at most 100 KB: transformers' Auto classes load it offline,
  its logits equal ours, its greedy generate equals our greedy decoding
  (experiments.generate --temperature=0's path), and export -> hf.load_checkpoint ->
  export gives identical tensors."""
  torch, transformers = _parity()
  import json
  import subprocess
  import sys
  import jax.numpy as jnp
  from safetensors.numpy import load_file
  from deepseek_jax.inference import decoding
  from deepseek_jax.inference.sampling import Sampling
  from deepseek_jax.train import loop
  from train_helpers import subprocess_env, tiny_run_config
  cfg = tiny_run_config(tmp_path, **{"model.scan_layers": True, "total_steps": 4,
                                     "eval_every": 4, "checkpoint_every": 4})
  loop.train(cfg, str(tmp_path / "run"), peak_flops=1e11, quiet=True,
             devices=jax.devices()[:1])
  out = tmp_path / "hf"
  r = subprocess.run([sys.executable, "-m", "experiments.export_hf",
                      f"--workdir={tmp_path / 'run'}", f"--out={out}",
                      "--max_shard_size=100KB"],
                     env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(out.glob("model-*-of-*.safetensors"))
  assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
  tensors = {}
  for s in shards:
    part = load_file(s)
    assert sum(a.nbytes for a in part.values()) <= 100_000 or len(part) == 1, s.name
    tensors.update(part)
  assert sorted(tensors) == sorted(index["weight_map"])

  model, variables, run_cfg, _ = decoding.load_workdir(str(tmp_path / "run"))
  bias = np.asarray(variables["balance"]["expert_bias"])
  assert np.abs(bias).max() > 0   # 4 steps of bias updates
  for row, layer in enumerate(range(model.cfg.first_k_dense, model.cfg.n_layers)):
    np.testing.assert_array_equal(
        tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"], bias[row])
  mtp = f"model.layers.{model.cfg.n_layers}."   # the released MTP layer index
  assert any(k.startswith(mtp + "eh_proj") for k in tensors)

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager", torch_dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = tok(["def add(a, b):\n    return", "import json\n\njson."])["input_ids"]
  assert ids[0] == list(b"def add(a, b):\n    return")   # the byte tokenizer's ids
  prompt = np.asarray([ids[0][:16], ids[1][:16]])
  ours = np.asarray(model.apply(variables, jnp.asarray(prompt)).logits)
  with torch.no_grad():
    theirs = hf_model(torch.tensor(prompt)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)

  want = decoding.generate(model, variables, [list(p) for p in prompt], 8, Sampling(0.0),
                           eos_id=tok.eos_token_id).tokens
  with torch.no_grad():
    got = hf_model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False)
  for row, w in zip(got.numpy()[:, prompt.shape[1]:], want):
    assert list(row[:len(w)]) == list(w)

  again = tmp_path / "again"
  m2, v2 = hf.load_checkpoint(out)
  hf.save_checkpoint(again, m2.cfg, v2, max_shard_bytes=100_000)
  index2 = json.loads((again / "model.safetensors.index.json").read_text())
  assert index2["weight_map"] == index["weight_map"]
  for s in shards:
    second = load_file(again / s.name)
    for k, a in load_file(s).items():
      np.testing.assert_array_equal(second[k], a, err_msg=k)
