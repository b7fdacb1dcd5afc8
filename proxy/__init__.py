"""llm-ratelimit-proxy: an OpenAI-compatible rate-limiting reverse proxy."""

__version__ = "0.1.0"
