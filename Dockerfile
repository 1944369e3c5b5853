# clipcap on a CUDA host. libtorch comes from the torch wheel on PyPI (the pin tch needs),
# the binary is built in a builder stage, and the runtime runs as a non-root user.
#
#   docker build -t clipcap .
#   docker run --gpus all -p 8080:8080 -v $PWD/models:/app/models clipcap
ARG TORCH_VERSION=2.11.0

FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 AS torch
ARG TORCH_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"

FROM torch AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential curl pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:/opt/torch/bin:$PATH \
    VIRTUAL_ENV=/opt/torch \
    LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY config config
COPY benches benches
RUN cargo build --bin clipcap && cp target/debug/clipcap /usr/local/bin/clipcap

FROM torch AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 clipcap
COPY --from=builder /usr/local/bin/clipcap /usr/local/bin/clipcap
ENV LD_LIBRARY_PATH=/opt/torch/lib/python3.12/site-packages/torch/lib \
    CLIPCAP_BIND=0.0.0.0:8080 \
    CLIPCAP_DEVICE=auto \
    CLIPCAP_MODELS=demo=/app/models/demo \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
WORKDIR /app
COPY --chown=clipcap:clipcap config config
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8080/ready"]
ENTRYPOINT ["clipcap", "serve"]
