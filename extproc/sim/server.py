"""An aiohttp app imitating OpenAI/Anthropic model servers that records everything it serves.

Per-request ``x-sim-*`` headers script it: ``status``, ``completion-tokens``, ``delay-ms``,
``abort-after``, ``omit-usage``; the token kinds a provider reports besides input and output:

- ``x-sim-cached-tokens: N``: N prompt tokens were read from a cache; ``x-sim-cache-write-tokens:
  N``: N were written to one; ``x-sim-reasoning-tokens: N``: N more completion tokens were spent
  reasoning (not sent as text). The prompt grows to hold the cached and written tokens. Each API
  reports them as its documentation says: OpenAI chat/completions in
  ``prompt_tokens_details.{cached_tokens,cache_write_tokens}`` and
  ``completion_tokens_details.reasoning_tokens`` (``CompletionUsage``), the Responses API in
  ``input_tokens_details`` and ``output_tokens_details`` (``ResponseUsage``; both
  openai/openai-openapi ``openapi.yaml`` at f85dbe22), Anthropic in ``cache_read_input_tokens``,
  ``cache_creation_input_tokens`` (``input_tokens`` is then the rest of the prompt) and
  ``output_tokens_details.thinking_tokens`` (anthropic-sdk-python ``types/usage.py`` at
  0c20cf40); the kinds not asked for are left out as before;

and, to play a misbehaving upstream:

- ``x-sim-usage: <JSON object>``: the response's ``usage`` object is this text, verbatim (so a
  400-digit literal or ``1e308`` reaches the client unchanged): in JSON bodies of every API and
  in the usage chunk of OpenAI streams (``stream_options.include_usage``);
- ``x-sim-pad-bytes: N``: N spaces after a JSON body (still valid JSON, RFC 8259 §2);
- ``x-sim-content-encoding: gzip``: a JSON body is sent gzip-compressed (RFC 1952), whether or
  not the client accepts it; with ``pad-bytes`` that makes a decompression bomb (100 MiB of
  padding compresses to about 100 KB).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import struct
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from extproc.sim.tokens import Api, completion_text, completion_tokens, piece, prompt_tokens

Record = dict[str, object]
Json = dict[str, Any]
Parts = tuple[list[bytes], list[bytes], list[bytes]]  # head, one chunk per token, tail

_ROUTES: dict[str, tuple[Api, str]] = {
    "/v1/chat/completions": ("chat", "POST"),
    "/v1/completions": ("completions", "POST"),
    "/v1/embeddings": ("embeddings", "POST"),
    "/v1/models": ("models", "GET"),
    "/v1/messages": ("messages", "POST"),
    "/v1/responses": ("responses", "POST"),
}
_RECORDS_PATH = "/_sim/records"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_MARK = "\x00"  # placeholder for the token text in precomputed chunk templates
_MARK_JSON = b"\\u0000"
_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_RAW_USAGE = "\x01sim-usage\x01"  # stands for the x-sim-usage text until the body is encoded
_RAW_USAGE_JSON = b'"\\u0001sim-usage\\u0001"'
_MAX_PAD_BYTES = 1 << 30


@dataclass(frozen=True)
class SimConfig:
    """Server-wide defaults; per-request `x-sim-*` headers override them."""

    models: tuple[str, ...] = ("facebook/opt-125m", "sim-model")
    chunk_delay_s: float = 0.0
    default_completion_tokens: int = 16


class _BadRequestError(ValueError):
    """The request cannot be served; answered with a 400."""


@dataclass(frozen=True)
class _Hostile:
    """How this response misbehaves (x-sim-usage, x-sim-pad-bytes, x-sim-content-encoding)."""

    usage: bytes | None = None
    pad_bytes: int = 0
    gzip: bool = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> _Hostile:
        usage = headers.get("x-sim-usage")
        if usage is not None:
            try:
                parsed = json.loads(usage)
            except ValueError:
                raise _BadRequestError("header x-sim-usage must be a JSON object") from None
            if not isinstance(parsed, dict):
                raise _BadRequestError("header x-sim-usage must be a JSON object")
        pad = _int_header(headers, "x-sim-pad-bytes") or 0
        if not 0 <= pad <= _MAX_PAD_BYTES:
            raise _BadRequestError(f"header x-sim-pad-bytes must be from 0 to {_MAX_PAD_BYTES}")
        encoding = headers.get("x-sim-content-encoding", "identity").lower()
        if encoding not in ("identity", "gzip"):
            raise _BadRequestError("header x-sim-content-encoding must be gzip or identity")
        return cls(None if usage is None else usage.encode(), pad, encoding == "gzip")

    def usage_of(self, usage: Json) -> object:
        """What goes where the usage object belongs: the real one, or the scripted text's mark."""
        return usage if self.usage is None else _RAW_USAGE

    def encode(self, data: bytes) -> bytes:
        """A body with the scripted usage spliced in (still uncompressed, not yet padded)."""
        return data if self.usage is None else data.replace(_RAW_USAGE_JSON, self.usage)

    def json(self, obj: object) -> web.Response:
        data = self.encode(_dumps(obj).encode())
        response = web.Response(content_type="application/json")
        if not self.gzip:
            response.body = data + b" " * self.pad_bytes
            return response
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip wrapper
        parts = [packer.compress(data)]
        spaces = b" " * (1 << 20)
        for start in range(0, self.pad_bytes, len(spaces)):
            parts.append(packer.compress(spaces[: self.pad_bytes - start]))
        parts.append(packer.flush())
        response.body = b"".join(parts)
        response.headers["Content-Encoding"] = "gzip"
        return response


def _kinds(headers: Mapping[str, str]) -> tuple[int | None, int | None, int | None]:
    """x-sim-cached-tokens, x-sim-cache-write-tokens, x-sim-reasoning-tokens (None: absent)."""
    out: list[int | None] = []
    for name in ("x-sim-cached-tokens", "x-sim-cache-write-tokens", "x-sim-reasoning-tokens"):
        value = _int_header(headers, name)
        if value is not None and not 0 <= value <= 10**9:
            raise _BadRequestError(f"header {name} must be from 0 to 1000000000")
        out.append(value)
    return out[0], out[1], out[2]


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _BadRequestError(f"header {name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class _Gen:
    """What one request generates."""

    rid: str
    created: int
    model: str
    prompt: int
    completion: int
    hit_limit: bool
    usage: bool  # False when x-sim-omit-usage asks for no usage at all
    include_usage: bool  # chat/completions streams: stream_options.include_usage
    hostile: _Hostile = _Hostile()
    # x-sim-cached-tokens, x-sim-cache-write-tokens, x-sim-reasoning-tokens (None: not reported)
    cached: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None

    @property
    def output(self) -> int:
        """The completion tokens reported: the text sent plus the reasoning."""
        return self.completion + (self.reasoning or 0)


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _sse(obj: object, event: str | None = None) -> bytes:
    data = f"data: {_dumps(obj)}\n\n"
    return (f"event: {event}\n{data}" if event else data).encode()


def _per_token(obj: object, n: int, event: str | None = None) -> list[bytes]:
    """n SSE chunks of `obj`, its `_MARK` string replaced by each token's text."""
    pre, post = _sse(obj, event).split(_MARK_JSON)
    return [pre + piece(i).encode() + post for i in range(n)]


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj).encode(), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    default = ("server_error" if status >= 500 else "invalid_request_error", None)
    kind, code = _ERRORS.get(status, default)
    err = {"message": message, "type": kind, "param": None, "code": code}
    return _json({"error": err}, status)


def _lenient_path(path: str) -> str:
    """The path as the most forgiving servers read it (written for the sim, not shared with the
    sidecar): ``;params`` dropped per segment (servlet containers), ``.`` and ``..`` resolved,
    empty segments (doubled or trailing slashes) ignored."""
    kept: list[str] = []
    for segment in path.split("/"):
        name = segment.split(";", 1)[0]
        if name == "..":
            del kept[-1:]
        elif name not in ("", "."):
            kept.append(name)
    return "/" + "/".join(kept)


def _openai_usage(g: _Gen) -> Json:
    out: Json = {
        "prompt_tokens": g.prompt,
        "completion_tokens": g.output,
        "total_tokens": g.prompt + g.output,
    }
    prompt_details = _details(cached_tokens=g.cached, cache_write_tokens=g.cache_write)
    if prompt_details:
        out["prompt_tokens_details"] = prompt_details
    if g.reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": g.reasoning}
    return out


def _details(**counts: int | None) -> Json:
    """The counts that were asked for."""
    return {name: n for name, n in counts.items() if n is not None}


# --- OpenAI chat completions and legacy completions -----------------------------------------


def _chat_json(g: _Gen) -> Json:
    message = {"role": "assistant", "content": completion_text(g.completion)}
    finish = "length" if g.hit_limit else "stop"
    out: Json = {
        "id": f"chatcmpl-{g.rid}",
        "object": "chat.completion",
        "created": g.created,
        "model": g.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    if g.usage:
        out["usage"] = g.hostile.usage_of(_openai_usage(g))
    return out


def _completions_json(g: _Gen) -> Json:
    finish = "length" if g.hit_limit else "stop"
    choice = {"text": completion_text(g.completion), "index": 0, "logprobs": None}
    out: Json = {
        "id": f"cmpl-{g.rid}",
        "object": "text_completion",
        "created": g.created,
        "model": g.model,
        "choices": [{**choice, "finish_reason": finish}],
    }
    if g.usage:
        out["usage"] = g.hostile.usage_of(_openai_usage(g))
    return out


def _openai_stream(g: _Gen, chat: bool) -> Parts:
    send_usage = g.usage and g.include_usage
    base: Json = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{g.rid}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": g.created,
        "model": g.model,
    }

    def chunk(choice: Json, finish: str | None) -> Json:
        out = {**base, "choices": [{"index": 0, **choice, "finish_reason": finish}]}
        return {**out, "usage": None} if send_usage else out

    token: Json
    last: Json
    if chat:
        head = [_sse(chunk({"delta": {"role": "assistant", "content": ""}}, None))]
        token, last = {"delta": {"content": _MARK}}, {"delta": {}}
    else:
        head = []
        token = {"text": _MARK, "logprobs": None}
        last = {"text": "", "logprobs": None}
    tail = [_sse(chunk(last, "length" if g.hit_limit else "stop"))]
    if send_usage:
        usage = g.hostile.usage_of(_openai_usage(g))
        tail.append(g.hostile.encode(_sse({**base, "choices": [], "usage": usage})))
    tail.append(_DONE)
    return head, _per_token(chunk(token, None), g.completion), tail


# --- Anthropic messages ------------------------------------------------------------------


def _messages_json(g: _Gen) -> Json:
    out: Json = {
        "id": f"msg_{g.rid}",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": completion_text(g.completion)}],
        "model": g.model,
        "stop_reason": "max_tokens" if g.hit_limit else "end_turn",
        "stop_sequence": None,
    }
    if g.usage:
        out["usage"] = g.hostile.usage_of(_anthropic_usage(g, g.output))
    return out


def _anthropic_usage(g: _Gen, output: int, *, thinking: bool = True) -> Json:
    """Anthropic's usage: ``input_tokens`` is the prompt neither read from nor written to a cache."""
    read, written = g.cached or 0, g.cache_write or 0
    out: Json = {
        "input_tokens": g.prompt - read - written,
        **_details(cache_creation_input_tokens=g.cache_write, cache_read_input_tokens=g.cached),
        "output_tokens": output,
    }
    if g.reasoning is not None and thinking:
        out["output_tokens_details"] = {"thinking_tokens": g.reasoning}
    return out


def _messages_stream(g: _Gen) -> Parts:
    message = {**_messages_json(g), "content": [], "stop_reason": None}
    stop = {"stop_reason": "max_tokens" if g.hit_limit else "end_turn", "stop_sequence": None}
    delta: Json = {"type": "message_delta", "delta": stop}
    if g.usage:
        message["usage"] = _anthropic_usage(g, 1, thinking=False)
        delta["usage"] = {"output_tokens": g.output}
        if g.reasoning is not None:
            delta["usage"]["output_tokens_details"] = {"thinking_tokens": g.reasoning}
    block = {"type": "text", "text": ""}
    head = [
        _sse({"type": "message_start", "message": message}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": block},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    token = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": _MARK},
    }
    tail = [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(delta, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return head, _per_token(token, g.completion, "content_block_delta"), tail


# --- OpenAI responses --------------------------------------------------------------------


def _responses_json(g: _Gen, done: bool = True) -> Json:
    text = completion_text(g.completion)
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": f"msg_{g.rid}", "type": "message", "status": "completed", "role": "assistant"}
    out: Json = {
        "id": f"resp_{g.rid}",
        "object": "response",
        "created_at": g.created,
        "status": "completed" if done else "in_progress",
        "error": None,
        "incomplete_details": None,
        "model": g.model,
        "output": [{**item, "content": [part]}] if done else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    if g.usage and done:
        out["usage"] = g.hostile.usage_of(
            {
                "input_tokens": g.prompt,
                "input_tokens_details": {
                    "cached_tokens": g.cached or 0,
                    **_details(cache_write_tokens=g.cache_write),
                },
                "output_tokens": g.output,
                "output_tokens_details": {"reasoning_tokens": g.reasoning or 0},
                "total_tokens": g.prompt + g.output,
            }
        )
    return out


def _responses_stream(g: _Gen) -> Parts:
    final = _responses_json(g)
    item, pending = final["output"][0], _responses_json(g, done=False)
    part = item["content"][0]
    ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    seq = itertools.count()

    def event(kind: str, **fields: object) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    head = [
        event("response.created", response=pending),
        event("response.in_progress", response=pending),
        event(
            "response.output_item.added",
            output_index=0,
            item={**item, "status": "in_progress", "content": []},
        ),
        event("response.content_part.added", **ids, part={**part, "text": ""}),
    ]
    delta = "response.output_text.delta"
    tokens = [event(delta, **ids, delta=piece(i), logprobs=[]) for i in range(g.completion)]
    tail = [
        event("response.output_text.done", **ids, text=part["text"], logprobs=[]),
        event("response.content_part.done", **ids, part=part),
        event("response.output_item.done", output_index=0, item=item),
        event("response.completed", response=final),
    ]
    return head, tokens, tail


# --- embeddings ----------------------------------------------------------------------------


def _vector(item: object, dims: int) -> list[float]:
    state = zlib.crc32(_dumps(item).encode())
    out = []
    for _ in range(dims):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(round(state / 0x7FFFFFFF * 2 - 1, 6))
    return out


def _embeddings_json(g: _Gen, body: Json) -> Json:
    raw = body.get("input")
    items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else 8
    data = []
    for i, item in enumerate(items):
        floats = _vector(item, dims)
        vec: object = floats
        if body.get("encoding_format") == "base64":
            vec = base64.b64encode(struct.pack(f"<{dims}f", *floats)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    out: Json = {"object": "list", "data": data, "model": g.model}
    if g.usage:
        out["usage"] = g.hostile.usage_of({"prompt_tokens": g.prompt, "total_tokens": g.prompt})
    return out


# --- the server ----------------------------------------------------------------------------


class SimServer:
    """The simulator app plus its runner; `records` is the live list of served requests."""

    def __init__(self, config: SimConfig = SimConfig()) -> None:
        self.config = config
        self.records: list[Record] = []
        self._seq = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._port = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    @property
    def port(self) -> int:
        return self._port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on host:port (0 picks a free port) and return the bound port."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        return self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path  # aiohttp has percent-decoded it already
        if path == _RECORDS_PATH:
            return self._records_endpoint(request)
        if request.headers.get("x-sim-lenient-path", "").lower() in _TRUE:
            path = _lenient_path(path)
        idx = path.rfind("/v1/")
        route = _ROUTES.get(path[idx:]) if idx >= 0 else None
        if route is None:
            return _error(404, f"no such route: {path}")
        api, method = route
        if request.method != method:
            return _error(405, f"{request.method} not allowed on {path}")
        segments = path[:idx].split("/")
        path_model = segments[2] if len(segments) > 2 and segments[2] else None
        rec: Record = {
            "seq": next(self._seq),
            "method": request.method,
            "path": path,
            "model": path_model or self.config.models[0],
            "api": api,
            "stream": False,
            "include_usage": False,
            "usage_sent": False,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cached_tokens": None,  # the kinds scripted with x-sim-*-tokens (None: not reported)
            "cache_write_tokens": None,
            "reasoning_tokens": None,
            "status": 200,
            "completed": True,
            "finished": True,  # false while a stream is still being written
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
        self.records.append(rec)
        try:
            return await self._serve(request, rec, api, path_model)
        except _BadRequestError as exc:
            rec["status"] = 400
            return _error(400, str(exc))

    async def _serve(
        self, request: web.Request, rec: Record, api: Api, path_model: str | None
    ) -> web.StreamResponse:
        headers = request.headers
        status = _int_header(headers, "x-sim-status")
        override = _int_header(headers, "x-sim-completion-tokens")
        delay_ms = _int_header(headers, "x-sim-delay-ms")
        abort_after = _int_header(headers, "x-sim-abort-after")
        omit_usage = headers.get("x-sim-omit-usage", "").lower() in _TRUE
        hostile = _Hostile.from_headers(headers)
        body: Json = {}
        if api != "models":
            try:
                parsed = json.loads(await request.read() or b"{}")
            except ValueError:
                raise _BadRequestError("request body is not valid JSON") from None
            if not isinstance(parsed, dict):
                raise _BadRequestError("request body must be a JSON object")
            body = parsed
        model = body.get("model")
        if isinstance(model, str) and model:
            rec["model"] = model
        stream = api not in ("models", "embeddings") and body.get("stream") is True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        rec.update(stream=stream, include_usage=include_usage)
        if status is not None and status >= 400:
            rec["status"] = status
            return _error(status, f"simulated error (x-sim-status: {status})")
        if api == "models":
            return _json(self._models(path_model))

        kinds = _kinds(headers)
        prompt = max(prompt_tokens(api, body), (kinds[0] or 0) + (kinds[1] or 0))
        completion, hit = (0, False)
        if api != "embeddings":
            default = self.config.default_completion_tokens
            completion, hit = completion_tokens(body, override, default)
        g = _Gen(
            rid=f"sim{rec['seq']}",
            created=int(time.time()),
            model=str(rec["model"]),
            prompt=prompt,
            completion=completion,
            hit_limit=hit,
            usage=not omit_usage,
            include_usage=include_usage,
            hostile=hostile,
            cached=kinds[0],
            cache_write=kinds[1],
            reasoning=kinds[2] if api != "embeddings" else None,
        )
        rec.update(prompt_tokens=prompt, completion_tokens=g.output)
        rec.update(cached_tokens=g.cached, cache_write_tokens=g.cache_write)
        rec.update(reasoning_tokens=g.reasoning)
        rec["total_tokens"] = prompt + g.output
        if not stream:
            rec["usage_sent"] = g.usage
            if api == "chat":
                return hostile.json(_chat_json(g))
            if api == "completions":
                return hostile.json(_completions_json(g))
            if api == "messages":
                return hostile.json(_messages_json(g))
            if api == "responses":
                return hostile.json(_responses_json(g))
            return hostile.json(_embeddings_json(g, body))

        if api in ("chat", "completions"):
            parts, usage_sent = _openai_stream(g, api == "chat"), g.usage and include_usage
        else:
            parts = _messages_stream(g) if api == "messages" else _responses_stream(g)
            usage_sent = g.usage
        delay = self.config.chunk_delay_s if delay_ms is None else delay_ms / 1000
        return await self._stream(request, rec, g, parts, delay, abort_after, usage_sent)

    async def _stream(
        self,
        request: web.Request,
        rec: Record,
        g: _Gen,
        parts: Parts,
        delay: float,
        abort_after: int | None,
        usage_sent: bool,
    ) -> web.StreamResponse:
        """Write an SSE stream; the record is final before the last byte leaves."""
        head, tokens, tail = parts
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        sent = 0

        def cut_short(completed: bool = False) -> None:
            rec.update(usage_sent=False, completed=completed, finished=True, completion_tokens=sent)
            rec["total_tokens"] = g.prompt + sent

        rec.update(completed=False, finished=False)
        try:
            await resp.prepare(request)
            if delay <= 0 and abort_after is None:  # fast path: one write
                rec.update(usage_sent=usage_sent, completed=True, finished=True)
                await resp.write(b"".join([*head, *tokens, *tail]))
                return resp
            await resp.write(b"".join(head))
            limit = len(tokens) if abort_after is None else min(max(abort_after, 0), len(tokens))
            for chunk in tokens[:limit]:
                if delay > 0:
                    await asyncio.sleep(delay)
                await resp.write(chunk)
                sent += 1
            if abort_after is not None:
                cut_short()
                if request.transport is not None:
                    request.transport.close()  # flushes what was written, then FIN: no [DONE]
                return resp
            if delay > 0:
                await asyncio.sleep(delay)
            rec.update(usage_sent=usage_sent, completed=True, finished=True)
            await resp.write(b"".join(tail))
            return resp
        except ConnectionError:  # the client went away
            cut_short()
            return resp
        except asyncio.CancelledError:
            cut_short()
            raise

    def _models(self, path_model: str | None) -> Json:
        ids = list(self.config.models)
        if path_model and path_model not in ids:
            ids.append(path_model)
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "sim"} for m in ids]
        return {"object": "list", "data": data}

    def _records_endpoint(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return _json(self.records)
        if request.method == "DELETE":
            count = len(self.records)
            self.records.clear()
            return _json({"deleted": count})
        return _error(405, f"{request.method} not allowed on {_RECORDS_PATH}")


async def serve_forever(host: str, port: int, config: SimConfig) -> None:
    """Run a simulator on host:port until cancelled."""
    server = SimServer(config)
    await server.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
