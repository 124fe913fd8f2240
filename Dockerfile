# One image for every Lethe service (compose.yaml): the coordinator side (SuperLink,
# ServerApp, deletion API, console) and the device side (daemon, SuperNode).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LETHE_DATA_DIR=/data

WORKDIR /app
# The CPU build of torch first (the default index would bring a CUDA build of several GB);
# a GPU image installs the `gpu` extra on a CUDA base instead.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY client ./client
COPY coordinator ./coordinator
COPY edge_models ./edge_models
COPY lethe ./lethe
COPY shared ./shared
RUN pip install -e . && useradd --create-home --uid 10001 lethe && mkdir /data \
    && chown lethe /data
USER lethe
VOLUME ["/data"]
CMD ["lethe", "--help"]
