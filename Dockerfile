# GPU image for every node of a MotionNFT cluster (head and workers run the same image).
# Build: docker build -t motionnft:latest .
# The CUDA build of torch comes from the base image; vLLM serves the judge on GPU nodes.
FROM rayproject/ray:2.60.0-py311-cu128

USER root
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/motionnft

# Dependencies first (cached layer), then the code.
COPY --chown=ray pyproject.toml README.md ./
COPY --chown=ray common common
COPY --chown=ray data data
COPY --chown=ray models models
COPY --chown=ray actors actors
COPY --chown=ray rewards rewards
COPY --chown=ray learner learner
RUN pip install --no-cache-dir "torch>=2.11,<2.16" "torchvision>=0.26,<0.30" \
 && pip install --no-cache-dir -e ".[gpu]"
COPY --chown=ray configs configs
COPY --chown=ray bench bench

# Weights and data come from S3 or mounted volumes, never from a hub.
ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
