"""Tests for the OpenAI/Anthropic-compatible model simulator in extproc.sim."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from extproc.sim.server import SimConfig, SimServer
from extproc.sim.tokens import completion_text, completion_tokens, count_words, prompt_tokens

CHAT: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there world"},
]
DEFAULT_TEXT = "".join(f"tok{i} " for i in range(16))


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = SimServer(SimConfig())
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
def base(sim: SimServer) -> str:
    return f"http://127.0.0.1:{sim.port}"


@pytest.fixture
async def client(base: str) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    yield c
    await c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sse(raw: str) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    out = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        event, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        out.append((event, data))
    return out


async def post(http: aiohttp.ClientSession, url: str, body: Any, **headers: str) -> tuple[int, str]:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    async with http.post(url, json=body, headers=hdrs) as resp:
        return resp.status, await resp.text()


async def read_all(resp: aiohttp.ClientResponse, into: list[bytes]) -> None:
    async for data in resp.content.iter_any():
        into.append(data)


# --- token counting -------------------------------------------------------------------------


def test_prompt_tokens_per_api() -> None:
    parts = [{"type": "text", "text": "one two"}, {"type": "image_url", "image_url": {}}]
    assert prompt_tokens("chat", {"messages": [{"role": "user", "content": parts}]}) == 2
    assert prompt_tokens("chat", {"messages": CHAT}) == 5
    assert prompt_tokens("completions", {"prompt": ["a b", "c"]}) == 3
    assert prompt_tokens("embeddings", {"input": "x  y\tz"}) == 3
    assert prompt_tokens("embeddings", {"input": [1, 2, 3, 4]}) == 4
    body = {"system": [{"type": "text", "text": "s1 s2"}], "messages": [{"content": "m"}]}
    assert prompt_tokens("messages", body) == 3
    items = [{"role": "user", "content": [{"type": "input_text", "text": "p q r s"}]}]
    assert prompt_tokens("responses", {"input": items}) == 4
    assert prompt_tokens("chat", {"messages": []}) == 1
    assert count_words(None) == 0


def test_completion_tokens_rules() -> None:
    assert completion_tokens({}) == (16, False)
    assert completion_tokens({}, default=4) == (4, False)
    assert completion_tokens({"max_tokens": 5}) == (5, True)
    assert completion_tokens({"max_completion_tokens": 6}) == (6, True)
    assert completion_tokens({"max_output_tokens": 7}) == (7, True)
    assert completion_tokens({"max_tokens": 5}, override=3) == (3, False)
    assert completion_tokens({"max_tokens": 5}, override=30) == (5, True)
    assert completion_tokens({}, override=30) == (30, False)
    assert completion_text(3) == "tok0 tok1 tok2 "


# --- chat completions -------------------------------------------------------------------------


async def test_chat_non_stream_usage(sim: SimServer, client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="m1", messages=CHAT)
    assert r.object == "chat.completion"
    assert r.model == "m1"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == DEFAULT_TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 16, 21)
    [rec] = sim.records
    assert rec["api"] == "chat"
    assert rec["usage_sent"] is True
    assert rec["completed"] is True
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (5, 16, 21)


async def test_max_tokens_and_header_override(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=5)
    assert r.usage is not None
    assert r.usage.completion_tokens == 5
    assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert r.choices[0].finish_reason == "length"
    hdr = {"x-sim-completion-tokens": "3"}
    r = await client.chat.completions.create(
        model="m",
        messages=CHAT,
        max_completion_tokens=5,
        extra_headers=hdr,
    )
    assert r.usage is not None
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "stop"
    hdr = {"x-sim-completion-tokens": "40"}
    r = await client.chat.completions.create(
        model="m",
        messages=CHAT,
        max_tokens=7,
        extra_headers=hdr,
    )
    assert r.usage is not None
    assert r.usage.completion_tokens == 7


async def test_determinism(client: openai.AsyncOpenAI) -> None:
    a = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=9)
    b = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=9)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


async def test_stream_without_include_usage(sim: SimServer, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == DEFAULT_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == 1 + 16 + 1
    [rec] = sim.records
    assert rec["stream"] is True
    assert rec["include_usage"] is False
    assert rec["usage_sent"] is False
    assert rec["completion_tokens"] == 16


async def test_stream_with_include_usage(sim: SimServer, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=CHAT,
        stream=True,
        max_tokens=4,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 4)
    assert last.usage.total_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    [rec] = sim.records
    assert (rec["include_usage"], rec["usage_sent"], rec["completed"]) == (True, True, True)


async def test_stream_raw_wire_format(base: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "messages": CHAT, "stream": True, "max_tokens": 2}
    body["stream_options"] = {"include_usage": True}
    async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = await resp.text()
    events = sse(raw)
    assert events[-1] == (None, "[DONE]")
    datas = [json.loads(d) for _, d in events[:-1]]
    assert all("usage" in d for d in datas)
    assert [d["usage"] for d in datas[:-1]] == [None] * 4
    assert datas[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

    del body["stream_options"]
    async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
        raw = await resp.text()
    assert '"usage"' not in raw
    assert raw.endswith("data: [DONE]\n\n")


async def test_stream_with_delay(sim: SimServer, base: str, http: aiohttp.ClientSession) -> None:
    body = {"messages": CHAT, "stream": True, "max_tokens": 3}
    status, raw = await post(http, f"{base}/v1/chat/completions", body, x_sim_delay_ms="5")
    assert status == 200
    assert len(sse(raw)) == 1 + 3 + 1 + 1
    assert sim.records[-1]["completed"] is True


async def test_prefix_routes(sim: SimServer, base: str, http: aiohttp.ClientSession) -> None:
    prefix = f"{base}/llm/facebook-opt-125m-simulated"
    c = openai.AsyncOpenAI(base_url=f"{prefix}/v1", api_key="x", max_retries=0)
    try:
        models = [m.id async for m in c.models.list()]
        assert models == ["facebook/opt-125m", "sim-model", "facebook-opt-125m-simulated"]
    finally:
        await c.close()
    status, raw = await post(http, f"{prefix}/v1/chat/completions", {"messages": CHAT})
    assert status == 200
    assert json.loads(raw)["model"] == "facebook-opt-125m-simulated"
    status, raw = await post(http, f"{prefix}/v1/completions", {"model": "x", "prompt": "a"})
    assert json.loads(raw)["model"] == "x"
    rec = sim.records[-2]
    assert rec["path"] == "/llm/facebook-opt-125m-simulated/v1/chat/completions"
    assert rec["model"] == "facebook-opt-125m-simulated"


# --- scripted failures -----------------------------------------------------------------------


async def test_sim_status(sim: SimServer, client: openai.AsyncOpenAI, base: str) -> None:
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="m",
            messages=CHAT,
            extra_headers={"x-sim-status": "429"},
        )
    async with aiohttp.ClientSession() as http:
        status, raw = await post(
            http, f"{base}/v1/messages", {"messages": CHAT}, x_sim_status="503"
        )
    assert status == 503
    body = json.loads(raw)
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert body["error"]["type"] == "server_error"
    assert [r["status"] for r in sim.records] == [429, 503]
    assert all(r["usage_sent"] is False for r in sim.records)


async def test_omit_usage(sim: SimServer, client: openai.AsyncOpenAI, base: str) -> None:
    omit = {"x-sim-omit-usage": "1"}
    r = await client.chat.completions.create(model="m", messages=CHAT, extra_headers=omit)
    assert r.usage is None
    assert r.choices[0].message.content == DEFAULT_TEXT
    body = {"messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as http:
        _, raw = await post(http, f"{base}/v1/chat/completions", body, **omit)
        _, anth = await post(http, f"{base}/v1/messages", {**body, "max_tokens": 2}, **omit)
        _, resp = await post(http, f"{base}/v1/responses", {"input": "a", "stream": True}, **omit)
    assert "usage" not in raw + anth + resp
    assert raw.endswith("data: [DONE]\n\n")
    assert "message_stop" in anth
    assert "response.completed" in resp
    assert [r["usage_sent"] for r in sim.records] == [False] * 4
    assert sim.records[1]["completion_tokens"] == 16


async def test_abort_after(sim: SimServer, base: str, http: aiohttp.ClientSession) -> None:
    body = {"messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks: list[bytes] = []
    async with http.post(
        f"{base}/v1/chat/completions", json=body, headers={"x-sim-abort-after": "3"}
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(resp, chunks)
    got = b"".join(chunks)
    events = sse(got.decode())
    contents = [json.loads(d)["choices"][0]["delta"].get("content") for _, d in events]
    assert contents == ["", "tok0 ", "tok1 ", "tok2 "]
    assert b"[DONE]" not in got
    [rec] = sim.records
    assert (rec["completed"], rec["usage_sent"]) == (False, False)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (5, 3, 8)


async def test_client_disconnect_recorded(sim: SimServer, base: str) -> None:
    body = {"messages": CHAT, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/v1/chat/completions", json=body, headers={"x-sim-delay-ms": "20"}
        ) as resp,
    ):
        await resp.content.readuntil(b"tok1 ")
    for _ in range(200):
        if sim.records[0]["completion_tokens"] != 16:
            break
        await asyncio.sleep(0.01)
    rec = sim.records[0]
    assert rec["completed"] is False
    assert rec["completion_tokens"] in range(2, 16)


async def test_bad_requests(sim: SimServer, base: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{base}/v1/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    status, _ = await post(http, f"{base}/v1/chat/completions", {}, x_sim_delay_ms="soon")
    assert status == 400
    async with http.get(f"{base}/v1/nothing") as resp:
        assert resp.status == 404
    async with http.get(f"{base}/v1/chat/completions") as resp:
        assert resp.status == 405
    assert [r["status"] for r in sim.records] == [400, 400]


# --- a misbehaving upstream: scripted usage text, padding, gzip --------------------------------

HOSTILE_USAGE = '{"prompt_tokens":1,"completion_tokens":2,"total_tokens":' + "9" * 400 + "}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
async def test_scripted_usage_is_sent_verbatim(
    base: str, http: aiohttp.ClientSession, path: str
) -> None:
    body = {"model": "m", "messages": CHAT, "prompt": "a b", "input": "a b"}
    status, text = await post(http, base + path, body, x_sim_usage=HOSTILE_USAGE)
    assert status == 200
    assert f'"usage":{HOSTILE_USAGE}' in text  # not re-encoded: every digit as given
    status, text = await post(http, base + path, body, x_sim_usage='{"total_tokens":1e308}')
    assert '"usage":{"total_tokens":1e308}' in text


async def test_scripted_usage_in_the_stream_usage_chunk(
    base: str, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "m",
        "messages": CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, text = await post(http, f"{base}/v1/chat/completions", body, x_sim_usage=HOSTILE_USAGE)
    assert status == 200
    usage_events = [data for _, data in sse(text) if '"choices":[]' in data]
    assert usage_events == [usage_events[0]]
    assert usage_events[0].endswith(f'"usage":{HOSTILE_USAGE}}}')


async def test_padding_and_gzip_make_a_decompression_bomb(
    base: str, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": CHAT}
    headers = {"x-sim-pad-bytes": str(100 << 20), "x-sim-content-encoding": "gzip"}
    url = f"{base}/v1/chat/completions"
    async with http.post(url, json=body, headers=headers, auto_decompress=False) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        packed = await resp.read()
    assert len(packed) < 110_000
    inflated = gzip.decompress(packed)
    assert len(inflated) > 100 << 20
    assert json.loads(inflated)["usage"]["total_tokens"] == 21  # valid JSON: padding is whitespace
    status, text = await post(http, url, body, x_sim_pad_bytes="3")
    assert status == 200
    assert text.endswith("}   ")


async def test_bad_hostile_scripts(base: str, http: aiohttp.ClientSession) -> None:
    url = f"{base}/v1/chat/completions"
    for headers in (
        {"x-sim-usage": "[1]"},
        {"x-sim-usage": "{nope"},
        {"x-sim-pad-bytes": "-1"},
        {"x-sim-content-encoding": "br"},
    ):
        status, _ = await post(http, url, {"model": "m"}, **headers)
        assert status == 400, headers


# --- legacy completions, embeddings, models ------------------------------------------------------


async def test_completions(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(model="m", prompt="one two", max_tokens=3)
    assert r.object == "text_completion"
    assert r.choices[0].text == "tok0 tok1 tok2 "
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 3, 5)
    stream = await client.completions.create(
        model="m",
        prompt=["one two", "three"],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 "
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 2)


async def test_embeddings(sim: SimServer, client: openai.AsyncOpenAI, base: str) -> None:
    r = await client.embeddings.create(model="e", input=["a b", "c d e"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in r.data)
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (5, 5)
    async with aiohttp.ClientSession() as http:
        _, raw = await post(http, f"{base}/v1/embeddings", {"input": ["a b", "c d e"]})
    floats = json.loads(raw)
    assert floats["object"] == "list"
    assert floats["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    for got, want in zip(r.data, floats["data"], strict=True):  # base64 and floats agree
        assert got.embedding == pytest.approx(want["embedding"], abs=1e-6)
    again = await client.embeddings.create(model="e", input=["a b", "c d e"])
    assert [d.embedding for d in again.data] == [d.embedding for d in r.data]
    assert sim.records[0]["api"] == "embeddings"
    assert sim.records[0]["completion_tokens"] == 0


async def test_models(sim: SimServer, client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert ids == ["facebook/opt-125m", "sim-model"]
    assert sim.records[0]["api"] == "models"
    assert sim.records[0]["method"] == "GET"


# --- anthropic messages ---------------------------------------------------------------------


ANTHROPIC = {
    "model": "claude-sim",
    "system": "you are terse",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
    "max_tokens": 7,
}


async def test_anthropic_json(sim: SimServer, base: str, http: aiohttp.ClientSession) -> None:
    status, raw = await post(http, f"{base}/v1/messages", ANTHROPIC)
    assert status == 200
    msg = json.loads(raw)
    assert (msg["type"], msg["role"], msg["model"]) == ("message", "assistant", "claude-sim")
    assert msg["content"] == [{"type": "text", "text": completion_text(7)}]
    assert msg["stop_reason"] == "max_tokens"
    assert msg["usage"] == {"input_tokens": 5, "output_tokens": 7}
    assert sim.records[0]["api"] == "messages"


async def test_anthropic_sse(sim: SimServer, base: str, http: aiohttp.ClientSession) -> None:
    body = {**ANTHROPIC, "stream": True}
    _, raw = await post(http, f"{base}/v1/messages", body, x_sim_completion_tokens="4")
    events = sse(raw)
    names = [e for e, _ in events if e != "ping"]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = {e: json.loads(d) for e, d in events}
    assert all(json.loads(d)["type"] == e for e, d in events)
    assert datas["message_start"]["message"]["usage"] == {"input_tokens": 5, "output_tokens": 1}
    assert datas["message_delta"]["usage"] == {"output_tokens": 4}
    assert datas["message_delta"]["delta"]["stop_reason"] == "end_turn"
    text = "".join(json.loads(d)["delta"]["text"] for e, d in events if e == "content_block_delta")
    assert text == "tok0 tok1 tok2 tok3 "
    rec = sim.records[0]
    assert (rec["usage_sent"], rec["completed"], rec["completion_tokens"]) == (True, True, 4)


# --- openai responses -----------------------------------------------------------------------


async def test_responses_json(sim: SimServer, client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(model="m", input="a b c", max_output_tokens=4)
    assert r.output_text == "tok0 tok1 tok2 tok3 "
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (3, 4, 7)
    assert sim.records[0]["api"] == "responses"


async def test_responses_sse(sim: SimServer, client: openai.AsyncOpenAI, base: str) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "w x y z"}]}]
    stream = await client.responses.create(model="m", input=items, stream=True)
    events = [e async for e in stream]
    assert events[0].type == "response.created"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_TEXT
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.usage is not None
    assert (done.response.usage.input_tokens, done.response.usage.output_tokens) == (4, 16)
    assert done.response.usage.total_tokens == 20
    async with aiohttp.ClientSession() as http:
        _, raw = await post(http, f"{base}/v1/responses", {"input": "a", "stream": True})
    assert "[DONE]" not in raw
    assert all(json.loads(d)["type"] == e for e, d in sse(raw))
    assert [r["completed"] for r in sim.records] == [True, True]


# --- records ----------------------------------------------------------------------------------


async def test_records_endpoint(sim: SimServer, base: str, http: aiohttp.ClientSession) -> None:
    await post(http, f"{base}/v1/chat/completions", {"messages": CHAT}, X_Tenant="Acme")
    await post(http, f"{base}/v1/embeddings", {"input": "q"})
    async with http.get(f"{base}/_sim/records") as resp:
        records = await resp.json()
    assert records == sim.records
    assert [r["seq"] for r in records] == [1, 2]
    first = records[0]
    assert set(first) == {
        "seq",
        "method",
        "path",
        "model",
        "api",
        "stream",
        "include_usage",
        "usage_sent",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "status",
        "completed",
        "finished",
        "headers",
    }
    assert first["headers"]["x-tenant"] == "Acme"
    assert first["model"] == "facebook/opt-125m"
    async with http.delete(f"{base}/_sim/records") as resp:
        assert (await resp.json()) == {"deleted": 2}
    assert sim.records == []
    async with http.get(f"{base}/_sim/records") as resp:
        assert await resp.json() == []


# --- token kinds (issue #16) ------------------------------------------------------------------

KINDS = {
    "x-sim-cached-tokens": "40",
    "x-sim-cache-write-tokens": "8",
    "x-sim-reasoning-tokens": "5",
}


async def test_chat_reports_cached_and_reasoning_tokens(
    sim: SimServer, client: openai.AsyncOpenAI
) -> None:
    """The OpenAI SDK reads them where its documented CompletionUsage keeps them."""
    r = await client.chat.completions.create(
        model="m", messages=CHAT, max_tokens=3, extra_headers=KINDS
    )
    usage = r.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (48, 8, 56)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 40
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 5
    assert r.choices[0].message.content == completion_text(3)  # reasoning is not sent as text
    stream = await client.chat.completions.create(
        model="m", messages=CHAT, max_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_headers=KINDS,
    )  # fmt: skip
    last = [chunk async for chunk in stream][-1]
    assert last.usage is not None
    assert last.usage.completion_tokens_details is not None
    assert (
        last.usage.completion_tokens,
        last.usage.completion_tokens_details.reasoning_tokens,
    ) == (8, 5)
    plain = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=3)
    assert plain.usage is not None
    assert plain.usage.prompt_tokens_details is None  # not asked for: not reported
    assert (sim.records[0]["cached_tokens"], sim.records[0]["reasoning_tokens"]) == (40, 5)


async def test_responses_report_cached_and_reasoning_tokens(client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(
        model="m", input="a b c", max_output_tokens=4, extra_headers=KINDS
    )
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (48, 9, 57)
    assert r.usage.input_tokens_details.cached_tokens == 40
    assert r.usage.output_tokens_details.reasoning_tokens == 5


async def test_anthropic_reports_cache_reads_writes_and_thinking(
    base: str, http: aiohttp.ClientSession
) -> None:
    """input_tokens is the prompt neither read from nor written to the cache (Anthropic's Usage)."""
    _, raw = await post(http, f"{base}/v1/messages", ANTHROPIC, **KINDS)
    assert json.loads(raw)["usage"] == {
        "input_tokens": 0,
        "cache_creation_input_tokens": 8,
        "cache_read_input_tokens": 40,
        "output_tokens": 12,
        "output_tokens_details": {"thinking_tokens": 5},
    }
    _, raw = await post(http, f"{base}/v1/messages", {**ANTHROPIC, "stream": True}, **KINDS)
    datas = {e: json.loads(d) for e, d in sse(raw)}
    start = datas["message_start"]["message"]["usage"]
    assert (start["cache_read_input_tokens"], start["cache_creation_input_tokens"]) == (40, 8)
    assert datas["message_delta"]["usage"] == {
        "output_tokens": 12,
        "output_tokens_details": {"thinking_tokens": 5},
    }


async def test_bad_kind_counts_are_refused(base: str, http: aiohttp.ClientSession) -> None:
    for value in ("-1", "x", "1000000001"):
        status, raw = await post(http, f"{base}/v1/messages", ANTHROPIC, x_sim_cached_tokens=value)
        assert status == 400, value
        assert "x-sim-cached-tokens" in raw
