"""Packaging for megatron-ultralong.

Runtime pins for development live in requirements.lock (what `make` installs); the ranges here are
what the package itself needs, so it installs beside an NGC container's own torch / megatron-core.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-ultralong",
    version="0.1.0",
    description="Ultra-long-context (1M-4M token) training for Llama on Megatron-Core: YaRN RoPE, "
    "context-parallel attention without Transformer Engine, long-context data, HF conversion.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ultralong", "megatron_ultralong.*"]),
    # The evaluation haystack text ships inside the package.
    package_data={"megatron_ultralong.eval": ["data/*.txt"]},
    install_requires=[
        "torch>=2.6",
        # 0.16.x is the newest line for Python 3.10/3.11; 0.17+ (Python 3.12) is supported too.
        "megatron-core>=0.16.0",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy",
        "PyYAML",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "sentencepiece", "tiktoken", "pyarrow", "zstandard", "matplotlib"],
        "data": ["sentencepiece", "tiktoken", "pyarrow", "zstandard", "matplotlib"],
        # GPU extras: built against the CUDA toolkit; the NGC PyTorch image already ships them.
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
        "eval": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "mu-build-dataset=megatron_ultralong.data.build.cli:main",
            "mu-train=megatron_ultralong.training.cli:main",
            "mu-convert=megatron_ultralong.convert.cli:main",
            "mu-eval-niah=megatron_ultralong.eval.cli:niah_main",
            "mu-eval-ruler=megatron_ultralong.eval.cli:ruler_main",
            "mu-eval-ppl=megatron_ultralong.eval.cli:ppl_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
