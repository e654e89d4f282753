"""Fault-test traffic: chat requests from the openai client (sync, async) and raw httpx, each
closing right after ``[DONE]`` or aborting mid-stream, reporting what the client saw."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import httpx
import openai
from openai.types.chat import ChatCompletionChunk, ChatCompletionUserMessageParam

PREFIX = "/llm/facebook-opt-125m-simulated/v1"
ClientKind = Literal["sync", "async", "raw"]
CLIENTS: tuple[ClientKind, ...] = ("sync", "async", "raw")
_DONE_LINE = "data: [DONE]"
_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Plan:
    """One request: its own model name, so its ledger row and simulator record pair up."""

    model: str
    client: ClientKind
    key: str  # the API key: which user pays
    stream: bool = True
    max_tokens: int = 8
    prompt_words: int = 6
    include_usage: bool = True  # False: the sidecar's injection must ask for usage
    abort_after: int | None = None  # events read before the client hangs up; None: to the end
    delay_ms: int = 0  # the simulator's pause between chunks (x-sim-delay-ms)

    @property
    def messages(self) -> list[ChatCompletionUserMessageParam]:
        return [{"role": "user", "content": " ".join(["meter"] * self.prompt_words)}]

    @property
    def headers(self) -> dict[str, str]:
        return {"x-sim-delay-ms": str(self.delay_ms)} if self.delay_ms else {}


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    completed: bool  # the client had the whole response: its usage and the end of the stream
    status: int  # the HTTP status, 0 when none arrived
    error: str = ""  # the exception the client raised, by class name


class _Aborted(Exception):
    """The plan's hang-up point was reached."""


def _stream_options(plan: Plan) -> dict[str, Any]:
    return {"stream_options": {"include_usage": True}} if plan.include_usage else {}


class _Args(TypedDict):
    model: str
    messages: list[ChatCompletionUserMessageParam]
    max_tokens: int
    extra_headers: dict[str, str]


def _args(plan: Plan) -> _Args:
    return {
        "model": plan.model,
        "messages": plan.messages,
        "max_tokens": plan.max_tokens,
        "extra_headers": plan.headers,
    }


@dataclass
class _Reader:
    """Follows one stream's chunks; says when the plan hangs up."""

    plan: Plan
    events: int = 0
    usage: bool = False

    def hangs_up_after(self, chunk: ChatCompletionChunk) -> bool:
        self.events += 1
        self.usage = self.usage or chunk.usage is not None
        return self.plan.abort_after is not None and self.events >= self.plan.abort_after

    def outcome(self) -> Outcome:
        return Outcome(self.plan, self.usage, 200)


def _failed(plan: Plan, exc: openai.APIError) -> Outcome:
    status = exc.status_code if isinstance(exc, openai.APIStatusError) else 0
    return Outcome(plan, False, status, type(exc).__name__)


def _sync_openai(client: openai.OpenAI, plan: Plan) -> Outcome:
    try:
        if not plan.stream:
            answer = client.chat.completions.create(**_args(plan))
            return Outcome(plan, answer.usage is not None, 200)
        reader = _Reader(plan)
        stream = client.chat.completions.create(
            **_args(plan), stream=True, extra_body=_stream_options(plan)
        )
        with stream:  # leaving closes the connection at once, as the client does after [DONE]
            for chunk in stream:
                if reader.hangs_up_after(chunk):
                    return Outcome(plan, False, 200, "aborted")
        return reader.outcome()
    except openai.APIError as exc:
        return _failed(plan, exc)


async def _async_openai(client: openai.AsyncOpenAI, plan: Plan) -> Outcome:
    try:
        if not plan.stream:
            answer = await client.chat.completions.create(**_args(plan))
            return Outcome(plan, answer.usage is not None, 200)
        reader = _Reader(plan)
        stream = await client.chat.completions.create(
            **_args(plan), stream=True, extra_body=_stream_options(plan)
        )
        async with stream:
            async for chunk in stream:
                if reader.hangs_up_after(chunk):
                    return Outcome(plan, False, 200, "aborted")
        return reader.outcome()
    except openai.APIError as exc:
        return _failed(plan, exc)


async def _raw(client: httpx.AsyncClient, key: str, plan: Plan) -> Outcome:
    """Reads SSE lines and hangs up the moment it has ``data: [DONE]`` (no read to EOF)."""
    body: dict[str, Any] = {
        "model": plan.model,
        "messages": plan.messages,
        "max_tokens": plan.max_tokens,
        **({"stream": True, **_stream_options(plan)} if plan.stream else {}),
    }
    headers = {"Authorization": f"Bearer {key}", **plan.headers}
    status = 0
    try:
        async with client.stream(
            "POST", PREFIX + "/chat/completions", json=body, headers=headers
        ) as response:
            status = response.status_code
            if status != 200:
                await response.aread()
                return Outcome(plan, False, status, "status")
            if not plan.stream:
                await response.aread()
                return Outcome(plan, "usage" in response.json(), status)
            usage, events = False, 0
            async for line in response.aiter_lines():
                if line == _DONE_LINE:
                    return Outcome(plan, usage, status)
                if line.startswith("data: "):
                    events += 1
                    usage = usage or '"usage":{' in line
                    if plan.abort_after is not None and events >= plan.abort_after:
                        raise _Aborted
            return Outcome(plan, False, status, "no [DONE]")
    except _Aborted:
        return Outcome(plan, False, status, "aborted")
    except httpx.HTTPError as exc:
        return Outcome(plan, False, status, type(exc).__name__)


Fault = Callable[
    [asyncio.Event], Coroutine[Any, Any, None]
]  # told by the event when the traffic is over


async def drive(
    base_url: str,
    plans: Sequence[Plan],
    concurrency: int,
    fault: Fault | None = None,
    fault_at: int = 0,
) -> list[Outcome]:
    """Run ``plans`` with ``concurrency`` in flight; start ``fault`` as request ``fault_at`` starts,
    and wait for it after the last request.

    Clients never retry (``max_retries=0``): a retry would be a second request under one model name.
    """
    keys = {plan.key for plan in plans}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sync_clients = {
        key: openai.OpenAI(
            base_url=base_url + PREFIX, api_key=key, max_retries=0, timeout=_TIMEOUT_S
        )
        for key in keys
    }
    async_clients = {
        key: openai.AsyncOpenAI(
            base_url=base_url + PREFIX, api_key=key, max_retries=0, timeout=_TIMEOUT_S
        )
        for key in keys
    }
    raw = httpx.AsyncClient(base_url=base_url, timeout=_TIMEOUT_S, limits=limits)
    threads = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    faults: list[asyncio.Task[None]] = []
    over = asyncio.Event()

    async def one(index: int, plan: Plan) -> Outcome:
        async with gate:
            if fault is not None and index == fault_at:
                faults.append(asyncio.create_task(fault(over)))
            if plan.client == "sync":
                return await loop.run_in_executor(
                    threads, _sync_openai, sync_clients[plan.key], plan
                )
            if plan.client == "async":
                return await _async_openai(async_clients[plan.key], plan)
            return await _raw(raw, plan.key, plan)

    try:
        outcomes = await asyncio.gather(*(one(i, plan) for i, plan in enumerate(plans)))
        over.set()
        await asyncio.gather(*faults)
        return list(outcomes)
    finally:
        for task in faults:
            task.cancel()
        await raw.aclose()
        for async_client in async_clients.values():
            await async_client.close()
        for sync_client in sync_clients.values():
            sync_client.close()
        threads.shutdown(wait=True)
