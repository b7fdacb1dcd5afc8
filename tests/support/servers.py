"""Real servers on real ports for end-to-end tests: the proxy under uvicorn, in a thread."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn

from proxy.http.connections import ConnectionGuard

from .ports import free_port


class ProxyServer:
    """`create_app(...)` served by uvicorn on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        # the protocol `llm-proxy serve` uses, with the app's `server:` settings
        self.guard = ConnectionGuard(app.state.snapshots.config.server)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            http=self.guard.protocol(),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ProxyServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("proxy server did not start")
            time.sleep(0.01)
        return self

    def wait_settled(self, timeout: float = 5.0) -> None:
        """Until every admitted request has settled (settlement follows a response's last byte)."""
        limiter = self.app.state.limiter
        deadline = time.monotonic() + timeout
        while limiter.unsettled:
            if time.monotonic() > deadline:
                raise AssertionError(f"{limiter.unsettled} requests still unsettled after {timeout}s")
            time.sleep(0.005)
        # the count comes down before the observer is told, later in the same step of the server's
        # loop (or the next, after a shielded settle): this thread saw 0 in between once, on loaded
        # cores, and the test found no outcome; a coroutine run on that loop ends after those steps
        self.run(asyncio.sleep(0))

    def run(self, coroutine, timeout: float = 10.0):
        """Run a coroutine on the server's own event loop (a reload, say); returns its result."""
        loop = self.server.servers[0].get_loop()
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
