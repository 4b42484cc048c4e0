# The producer side (the example web app): slim Python, the light inferq install, no torch.
FROM python:3.12-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY workers ./workers
COPY examples ./examples
RUN pip install ".[examples]"
RUN useradd --create-home inferq
USER inferq
EXPOSE 8000
CMD ["uvicorn", "examples.webapp:app", "--host", "0.0.0.0", "--port", "8000"]
