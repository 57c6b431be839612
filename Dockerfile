# megatron-ultralong on NVIDIA's PyTorch container: CUDA, NCCL, cuDNN, Transformer Engine, NVIDIA
# apex and flash-attn come with the base image, so nothing here compiles CUDA code.
# Build:  docker build -t megatron-ultralong .
# Run:    docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it megatron-ultralong
#
# The base image is pinned to one release (Python 3.12, torch 2.9); to pin its bytes as well, build
# with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch@sha256:<digest of the tag you pulled>.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    # Megatron-Core overlaps communication with compute only if kernels queue in order.
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    # The CP attention allocates blocks of many sizes; expandable segments keep them from fragmenting.
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

WORKDIR /opt/megatron-ultralong

# 1. Dependencies first, in their own layer: a code edit below does not reinstall them. The
#    versions are the ones CI tests (requirements.lock); the container's own torch, numpy, TE,
#    apex and flash-attn are kept (pip never replaces torch: a resolve could pull another CUDA build).
RUN python -c "import torch; print('torch', torch.__version__)" \
 && pip install --no-deps "megatron-core==0.16.1" \
 && pip install "transformers==5.24.0" "tokenizers==0.23.3" "huggingface_hub==2.4.0" "safetensors==0.8.0" \
        "PyYAML==6.0.3" "tqdm==4.70.1" "Jinja2==3.1.6" "sentencepiece==0.2.3" "tiktoken==0.14.0" \
        "zstandard==0.25.0" pyarrow matplotlib

# 2. The package itself (a wheel install: console scripts on PATH, eval haystack included), plus
#    the recipes, launchers and tools the Slurm templates use from /opt/megatron-ultralong.
COPY pyproject.toml README.md LICENSE ./
COPY megatron_ultralong ./megatron_ultralong
RUN pip install --no-deps . \
 && python -c "import megatron.core, megatron_ultralong, transformer_engine.pytorch; print('ok')" \
 && mu-train --help > /dev/null && mu-convert --help > /dev/null
COPY tools ./tools
COPY examples ./examples

CMD ["bash"]
