"""deepseek-jax: DeepSeek-V3-style models (MLA, DeepSeekMoE, aux-loss-free balancing, MTP)
in JAX/Flax, from a laptop CPU to a pod."""

from setuptools import find_packages, setup

setup(
    name="deepseek-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["deepseek_jax", "deepseek_jax.*", "experiments",
                                    "experiments.*", "configs", "configs.*"]),
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "numpy>=2.0",
        "tokenizers>=0.20",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        # The loader's ordered, threaded prefetch (train/batches.py Prefetcher).
        "grain>=0.2.18",
    ],
    extras_require={
        # pytest-xdist: pytest.ini runs the suite in 2 worker processes (XLA compiles
        # on one core each; docs/history.md, "Fast feedback").
        # tokamax: the GPU kernels' libraries are tested on CPU through their XLA paths.
        # pyarrow: prepare_data's parquet and save_to_disk readers are tested.
        "test": ["pytest>=8", "pytest-xdist>=3.6", "tokamax==0.0.12", "pyarrow>=14"],
        # The Hugging Face reference for the parity tests. torch is pinned to the CPU
        # wheel: an unpinned torch pulls a multi-GB CUDA build.
        "parity": ["torch==2.13.0", "transformers>=5.0", "safetensors>=0.4"],
        # TPU compilation on any host (experiments.compile): libtpu at the pinned jax.
        "tpu": ["jax[tpu]==0.10.2"],
        # NVIDIA GPUs: the CUDA 12 plugin at the pinned jax, and tokamax for the fused
        # attention ("tokamax") and grouped-GEMM experts (grouped_matmul="tokamax").
        # attention_impl="cudnn" needs only jax's cuDNN. docs/scale.md, "On NVIDIA GPUs".
        "cuda": ["jax[cuda12]==0.10.2", "tokamax==0.0.12"],
    },
)
