# The proxy image. The compose file also runs the mock upstream from it (another entrypoint).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs: a change to tests or docs does not rebuild this layer.
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
# EXTRAS="[examples]" adds the openai SDK for examples/ (the compose traffic generator)
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS}" \
    && rm -rf /src/build /src/*.egg-info

RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin llmproxy
USER llmproxy
WORKDIR /home/llmproxy

EXPOSE 8080

# slim has no curl: ask Python. Compose overrides this for services on other ports.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["llm-proxy"]
CMD ["serve", "--config", "/etc/llm-proxy/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
