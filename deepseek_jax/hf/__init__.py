"""Hugging Face DeepSeek-V3 checkpoints (SPEC.md section 7) <-> our model and variables.

config.py maps config.json to ModelConfig and back; weights.py holds the one table of
weight rules (HF tensor names and layouts <-> our leaves); checkpoint.py reads and writes
safetensors folders with it; tokenizer.py exports our tokenizers. The functions callers
use are re-exported here: `from deepseek_jax import hf; hf.load_checkpoint(...)`.
"""

from deepseek_jax.hf.checkpoint import load_checkpoint, save_checkpoint
from deepseek_jax.hf.config import config_from_hf, config_to_hf
from deepseek_jax.hf.tokenizer import save_tokenizer
from deepseek_jax.hf.weights import BIAS

__all__ = ["BIAS", "config_from_hf", "config_to_hf", "load_checkpoint", "save_checkpoint",
           "save_tokenizer"]
