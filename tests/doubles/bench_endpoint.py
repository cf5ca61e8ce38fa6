"""A trivial local streaming endpoint, to measure the load generator's own overhead.

It answers `POST /v1/chat/completions` (server-sent events, vLLM's shape) and
`POST /api/chat` (NDJSON, Ollama's shape) with `max_tokens` / `num_predict`
one-word chunks written at once: no model, no waiting, so whatever time a
benchmark against it measures is the client's. It is no stand-in for an engine's
behaviour under load; it exists so that `orchestrate bench --self-test` can say
what one control core can drive.

Responses are precomputed per (protocol, tokens, usage) and sent in one write,
so the endpoint does far less work per request than the client that parses them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import lru_cache

_HEAD = ("HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n"
         "Connection: keep-alive\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@lru_cache(maxsize=64)
def _sse(tokens: int, usage: bool) -> bytes:
    """What vLLM streams: a role chunk, one chunk per token, the usage chunk if asked, [DONE]."""
    def event(obj: dict[str, object]) -> bytes:
        return _chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    base = {"id": "chatcmpl-selftest", "object": "chat.completion.chunk", "created": 0,
            "model": "selftest"}
    parts = [event({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                 "content": ""},
                                          "finish_reason": None}]})]
    for i in range(tokens):
        finish = "length" if i == tokens - 1 else None
        parts.append(event({**base, "choices": [{"index": 0, "delta": {"content": " tok"},
                                                 "finish_reason": finish}]}))
    if usage:
        parts.append(event({**base, "choices": [], "usage": {
            "prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}}))
    parts.append(_chunk(b"data: [DONE]\n\n"))
    return _HEAD.format(ctype="text/event-stream").encode() + b"".join(parts) + b"0\r\n\r\n"


@lru_cache(maxsize=64)
def _ndjson(tokens: int) -> bytes:
    """What Ollama's /api/chat streams: one message per token, then the `done` record."""
    parts = [_chunk(json.dumps({"model": "selftest", "created_at": "1970-01-01T00:00:00Z",
                                "message": {"role": "assistant", "content": " tok"},
                                "done": False}).encode() + b"\n") for _ in range(tokens)]
    parts.append(_chunk(json.dumps({
        "model": "selftest", "created_at": "1970-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": ""}, "done": True,
        "done_reason": "length", "prompt_eval_count": 1, "eval_count": tokens}).encode()
        + b"\n"))
    return (_HEAD.format(ctype="application/x-ndjson").encode() + b"".join(parts)
            + b"0\r\n\r\n")


def _response(path: str, body: bytes) -> bytes:
    if path not in ("/v1/chat/completions", "/api/chat"):
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    request = json.loads(body)
    if path == "/api/chat":
        return _ndjson(int(request.get("options", {}).get("num_predict", 16)))
    usage = bool((request.get("stream_options") or {}).get("include_usage"))
    return _sse(int(request.get("max_tokens", 16)), usage)


async def _serve_connection(reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                           if line.lower().startswith("content-length:")), 0)
            writer.write(_response(path, await reader.readexactly(length)))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client closed its connection
    finally:
        writer.close()


async def serve(port: int, on_ready: Callable[[int], None]) -> None:
    """Serve on 127.0.0.1:`port` (0: any free port) until cancelled; `on_ready` gets the port."""
    server = await asyncio.start_server(_serve_connection, "127.0.0.1", port, backlog=1024)
    async with server:
        on_ready(server.sockets[0].getsockname()[1])
        await server.serve_forever()
