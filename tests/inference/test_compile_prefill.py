"""The prefill compile (inference/compile_prefill.py) on a small config: per-chip bytes
from the compiled program and a compute roofline from the model's FLOP count."""

import importlib

import pytest

from deepseek_jax.inference import compile_prefill
from deepseek_jax.train import tpu
from deepseek_jax.train.metrics import train_flops_per_token
from tests.inference.test_compile_decode import MESH, SMOKE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="TPU compilation needs libtpu: pip install -e '.[tpu]'")


def test_prefill_report_for_a_v5p_host():
  B, S = 8, 512
  r = compile_prefill.prefill_report(SMOKE, "v5p:2x2x2", B, S, MESH)
  m = SMOKE
  b = r["per_chip_bytes"]
  assert r["fits_hbm"] and r["compile_s"] > 0
  assert b["cache"] * r["n_chips"] == B * S * m.n_layers * (m.kv_lora_rank
                                                             + m.qk_rope_head_dim) * 2
  assert b["total"] >= b["weights"] + b["cache"] and b["temporaries"] > 0
  per_token = compile_prefill.prefill_flops_per_token(m, S)
  # The forward without MTP, less the head at all but the last token.
  assert per_token == pytest.approx(train_flops_per_token(m.replace(mtp_depth=0), S) / 3
                                    - 2 * m.d_model * m.vocab_size * (1 - 1 / S))
  assert r["flops"]["analytic_total"] == pytest.approx(per_token * B * S)
  rf, chip = r["roofline"], tpu.CHIPS["v5p"]
  assert rf["compute_s"] == pytest.approx(per_token * B * S / (r["n_chips"] * chip.peak_flops))
  assert rf["step_s"] == max(rf["compute_s"], rf["hbm_s"])
  assert rf["tokens_per_s_per_chip"] == pytest.approx(B * S / rf["step_s"] / r["n_chips"])
  assert "prefill on v5p:2x2x2" in compile_prefill.format_prefill_report(r)
  with pytest.raises(ValueError, match="multiple of the 8 request shards"):
    compile_prefill.prefill_report(SMOKE, "v5p:2x2x2", 12, S, MESH)
