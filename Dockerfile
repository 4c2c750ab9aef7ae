# One image for every pipeline service: the stage workers, the fake Claude API and the demo
# producer (compose.yaml, deploy/). Build: docker build -t claude-pipeline .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the distribution installs; tests, docs and benchmarks stay out (.dockerignore).
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY observability ./observability
# otlp: trace/metric export (OTEL_* env); fast: uvloop.
RUN pip install ".[otlp,fast]"

# No root inside the container (Kubernetes manifests set runAsNonRoot).
RUN useradd --create-home --uid 10001 pipeline
USER 10001

# Workers exit 0 on SIGTERM after their grace period (runtime.grace_s, default 20 s).
STOPSIGNAL SIGTERM
CMD ["pipeline", "--help"]
