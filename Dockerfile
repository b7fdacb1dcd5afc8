# The proxy image. The compose file also runs the mock upstream from it (another entrypoint).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    LLM_PROXY_DEMO_HOST=0.0.0.0

WORKDIR /src
# Only what the package needs: a change to tests or docs does not rebuild this layer.
# constraints.txt pins every dependency's version, so a rebuild installs the same set.
COPY pyproject.toml README.md constraints.txt ./
COPY proxy/ ./proxy/
# EXTRAS="[examples]" adds the openai SDK for examples/ (the compose traffic generator)
ARG EXTRAS=""
RUN pip install --no-cache-dir --constraint constraints.txt ".${EXTRAS}" \
    && rm -rf /src/build /src/*.egg-info

# A fixed uid (10001, deploy/kubernetes runs as it) above the system range: no --system, which
# would warn about it; --no-log-init keeps a large uid from making a huge sparse lastlog.
RUN useradd --uid 10001 --no-log-init --create-home --shell /usr/sbin/nologin llmproxy
USER llmproxy
WORKDIR /home/llmproxy

EXPOSE 8080

# slim has no curl: ask Python. Compose overrides this for services on other ports.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["llm-proxy"]
CMD ["serve", "--config", "/etc/llm-proxy/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
