"""A fast fake OpenAI upstream for benchmarks: standard-library asyncio, keep-alive, chunked SSE.

Answers every POST with a fixed chat completion; `"stream": true` gets `--chunks` SSE events
(plus the usage chunk when `include_usage` is asked), `x-bench-delay-ms: N` sleeps N ms between
chunks (slow streams). Responses are prebuilt bytes, so the upstream costs next to nothing and
the proxy's own cost shows.

    python bench/fake_upstream.py --port 9100 --chunks 16
"""

from __future__ import annotations

import argparse
import asyncio
import json

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 16,
    "total_tokens": 28,
    "prompt_tokens_details": {"cached_tokens": 0},
}


def build_responses(chunks: int) -> dict[str, bytes]:
    completion = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "bench-model",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "word " * chunks}, "finish_reason": "stop"}
            ],
            "usage": USAGE,
        },
        separators=(",", ":"),
    ).encode()
    plain = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(completion)).encode()
        + b"\r\n\r\n"
        + completion
    )

    def event(payload: dict) -> bytes:
        data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        return hex(len(data))[2:].encode() + b"\r\n" + data + b"\r\n"

    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench-model"}
    events = [
        event(
            {
                **base,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                "usage": None,
            }
        )
    ]
    events += [
        event({**base, "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}], "usage": None})
        for _ in range(chunks - 2)
    ]
    events.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}))
    usage = event({**base, "choices": [], "usage": USAGE})
    done = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return {"plain": plain, "head": head, "events": events, "usage": usage, "done": done}


class Upstream(asyncio.Protocol):
    def __init__(self, responses: dict):
        self.responses = responses
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streams: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            marker = head.find(b"content-length:")
            if marker >= 0:
                length = int(head[marker + 15 : head.find(b"\r\n", marker) if head.find(b"\r\n", marker) > 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.answer(head, body)

    def answer(self, head: bytes, body: bytes):
        if b'"stream":true' not in body.replace(b" ", b""):
            self.transport.write(self.responses["plain"])
            return
        delay = 0.0
        marker = head.find(b"x-bench-delay-ms:")
        if marker >= 0:
            delay = int(head[marker + 17 :].split(b"\r\n", 1)[0]) / 1000
        usage = b"include_usage" in body
        if delay:
            stream = asyncio.ensure_future(self.slow_stream(delay, usage))
            self.streams.add(stream)
            stream.add_done_callback(self.streams.discard)
            return
        r = self.responses
        self.transport.write(r["head"] + b"".join(r["events"]) + (r["usage"] if usage else b"") + r["done"])

    async def slow_stream(self, delay: float, usage: bool):
        r = self.responses
        self.transport.write(r["head"])
        for event in r["events"]:
            await asyncio.sleep(delay)
            if self.transport.is_closing():
                return
            self.transport.write(event)
        self.transport.write((r["usage"] if usage else b"") + r["done"])


async def serve(host: str, port: int, chunks: int):
    responses = build_responses(chunks)
    server = await asyncio.get_running_loop().create_server(lambda: Upstream(responses), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.install()
    asyncio.run(serve(args.host, args.port, args.chunks))


if __name__ == "__main__":
    main()
