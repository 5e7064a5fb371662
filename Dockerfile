# The CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation" container for sammed3d_jax.
#
#   python -m sammed3d_jax.convert sam_med3d_turbo_bbox_cvpr.pth ckpt/cvpr25   # or any converted params dir
#   docker build -t sammed3d_jax_cvpr25 --build-arg CHECKPOINT=ckpt/cvpr25 .
#   docker run --gpus "device=0" --rm -v $PWD/inputs/:/workspace/inputs/ -v $PWD/outputs/:/workspace/outputs/ \
#       sammed3d_jax_cvpr25:latest /bin/bash -c "sh predict.sh"
#
# JAX's CUDA wheels bring their own CUDA libraries; the host needs only the NVIDIA driver and container toolkit.
FROM python:3.12-slim

ARG CHECKPOINT=ckpt/cvpr25
ARG JAX_EXTRA=cuda12
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SAMMED3D_JAX_CACHE=/opt/sammed3d_jax/jax_cache \
    XLA_PYTHON_CLIENT_PREALLOCATE=false

WORKDIR /workspace
COPY pyproject.toml README.md /opt/sammed3d_jax/src/
COPY sammed3d_jax /opt/sammed3d_jax/src/sammed3d_jax
RUN pip install "jax[${JAX_EXTRA}]>=0.6.0,<0.12" && pip install /opt/sammed3d_jax/src && \
    mkdir -p /opt/sammed3d_jax/jax_cache && chmod -R a+rwX /opt/sammed3d_jax
COPY ${CHECKPOINT} /opt/sammed3d_jax/checkpoint
COPY predict.sh /workspace/predict.sh
