# GPU image for every node of a MotionNFT cluster (head and workers run the same image).
# Build: docker build -t motionnft:latest .
# The CUDA build of torch comes from the base image; vLLM serves the judge on GPU nodes.
FROM rayproject/ray:2.60.0-py311-cu128

USER root
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/motionnft

# 1. The dependencies alone, read from pyproject.toml: this layer is rebuilt only when they change, never for
#    a code edit.
COPY --chown=ray pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The code, then the project itself without touching the dependencies installed above.
COPY --chown=ray README.md ./
COPY --chown=ray motionnft_core motionnft_core
COPY --chown=ray actors actors
COPY --chown=ray rewards rewards
COPY --chown=ray learner learner
COPY --chown=ray evaluation evaluation
RUN pip install --no-cache-dir --no-deps -e .
COPY --chown=ray configs configs
COPY --chown=ray bench bench

# Weights and data come from S3 or mounted volumes, never from a hub.
ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
