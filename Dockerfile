# CPU image with every command of the project: cloud-server, edge-client, split-ray, split-demo, attacker.
# Not built or tested on the project's build machines (they have no Docker engine): see docs/DEPLOY.md.
#   docker build -t splitnet .
#   docker run --rm splitnet split-demo --out /tmp/demo
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# As `make setup` does: torch and its matching torchvision first, alone, from PyTorch's CPU
# index (left to the resolver, the project's dependencies pull a CUDA torch of several GB, and
# the default torchvision wheel's operators do not load against a CPU torch); then the project
# with every role, all versions exact from constraints.txt.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /opt/splitnet
COPY constraints.txt ./
RUN pip install -c constraints.txt --no-deps --index-url ${TORCH_INDEX} torch torchvision
COPY pyproject.toml README.md ./
COPY proto proto
COPY splitnet splitnet
COPY edge_client edge_client
COPY cloud_server cloud_server
COPY cem cem
COPY attacks attacks
COPY deploy deploy
RUN pip install -c constraints.txt ".[all]" && useradd --create-home --uid 1000 split

USER split
WORKDIR /home/split
# cloud-server's default port. It binds 127.0.0.1 unless told otherwise; in a container,
# `--host 0.0.0.0` plus a published port (-p), with TLS and a token beyond one machine.
EXPOSE 50051
CMD ["split-ray", "--help"]
