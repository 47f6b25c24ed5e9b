# megatron-mile on NVIDIA's PyTorch container: CUDA, NCCL, torch, Transformer Engine and apex come from
# the base image; this image adds megatron-core and this project. Usage: docs/docker.md.
#
# Pinned release: 25.12 (NVIDIA's release notes: Python 3.12, CUDA 13.1.0, torch 2.10.0a0), so megatron-core
# 0.19.x installs (it needs Python >= 3.12 and torch >= 2.6; its wheel is built for CPython 3.12 only).
FROM nvcr.io/nvidia/pytorch:25.12-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The container's own torch must never be replaced by a PyPI wheel (that would drop NVIDIA's CUDA build):
# every pip call below honours the constraints file written next.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/pip-constraints.txt

WORKDIR /workspace/megatron-mile

# Pin whatever torch the base image has, so no dependency resolution can reinstall it; then the
# dependencies (setup.py's install_requires), in a layer that stays cached while the sources change.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /etc/pip-constraints.txt \
    && pip install --no-cache-dir "megatron-core>=0.19.2,<0.20" "nltk>=3.9" "tokenizers>=0.19" \
        "sentencepiece>=0.2" "zstandard>=0.22"

COPY . .
# --no-deps: the install above (and the base image) provide everything; nothing is re-resolved.
# Ubuntu 24.04-based releases already have a uid 1000 user ("ubuntu"): reuse it, else create one.
RUN pip install --no-cache-dir --no-deps -e . \
    && if ! id -u 1000 > /dev/null 2>&1; then useradd --create-home --uid 1000 mile; fi \
    && chown -R 1000:1000 /workspace/megatron-mile

# Numeric, so the host resolves it (files written to mounted volumes belong to uid 1000).
USER 1000:1000

ENTRYPOINT ["torchrun"]
CMD ["--help"]
