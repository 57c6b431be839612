# megatron-ultralong on NVIDIA's PyTorch container: CUDA, NCCL, cuDNN, Transformer Engine, NVIDIA
# apex and flash-attn come with the base image, so nothing here compiles CUDA code.
# Build:  docker build -t megatron-ultralong .
# Run:    docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it megatron-ultralong
#
# The image's Python is 3.12, where megatron-core 0.17+ installs (0.16.x is the newest for 3.11).
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    # Megatron-Core overlaps communication with compute only if kernels queue in order.
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/megatron-ultralong
COPY setup.py README.md ./
COPY megatron_ultralong ./megatron_ultralong
COPY tools ./tools
COPY examples ./examples

# Keep the container's own torch / TE / apex / flash-attn: install only what is missing, and never
# let pip replace torch (an unpinned resolve could pull a different CUDA build).
RUN python -c "import torch; print('torch', torch.__version__)" \
 && pip install --no-deps "megatron-core>=0.16.0,<0.20" \
 && pip install "transformers>=4.56,<5.0" "tokenizers>=0.21" "safetensors>=0.4" PyYAML tqdm \
        sentencepiece tiktoken pyarrow zstandard matplotlib \
 && pip install --no-deps -e . \
 && python -c "import megatron.core, megatron_ultralong, transformer_engine.pytorch; print('ok')"

CMD ["bash"]
