# The producer side: the OpenAI gateway, the example web app and Flower. Slim Python, the light inferq install,
# no torch.
FROM python:3.12-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY workers ./workers
COPY benchmarks ./benchmarks
COPY examples ./examples
RUN pip install ".[examples,flower,gateway]" \
    && useradd --uid 10001 --create-home inferq
USER 10001
EXPOSE 8000 5555 8080
CMD ["uvicorn", "examples.webapp:app", "--host", "0.0.0.0", "--port", "8000"]
