"""The lean layout's two ways a finished request reaches the sidecar, in-process with a real
sidecar (memory store): the Lua settle filter's ``POST /settle`` on the HTTP authorization port,
and Envoy's OpenTelemetry access log (``LogsService/Export`` over gRPC).

The requests are written from what Envoy 1.40 sends: the settle body as the filter in
deploy/local/filters.yaml (``settle``) builds it, and log records with every attribute a string,
as Envoy's OpenTelemetry formatter renders the ``attributes`` of ``usage_access_log``
(envoyproxy/envoy source/extensions/access_loggers/open_telemetry/grpc_access_log_impl.cc at
a49e36ac; the records were checked against a running Envoy 1.40).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import time
import zlib
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.logs.v1 import logs_pb2

from extproc.app import Server, Sidecar
from extproc.envoy import handover
from extproc.envoy.http_settle import _since as since_admission
from extproc.stack import free_port
from tests.helpers import KEYS, local_config
from tests.integration.test_http_authz import check, exchange, server

__all__ = ["server"]  # the HTTP authorization port's sidecar fixture, shared


async def admitted(server: Server, model: str, **extra: object) -> str:
    """The billing record ext_authz's reply leaves in metadata for one admitted request."""
    body = json.dumps({"model": model, "max_tokens": 8, **extra}).encode()
    ((status, headers, _),) = await exchange(server, check(KEYS["premium"], body))
    assert status == 200
    return headers[handover.BILLING_HEADER]


def settle(billing: str, usage: str, status: str = "200", sent: str = "") -> bytes:
    """``POST /settle`` as the Lua filter sends it (``sent``: a body's size, not a stream's)."""
    body = f"{billing}\n{usage}".encode()
    size = f"x-maas-bytes: {sent}\r\n" if sent else ""
    head = (
        "POST /settle HTTP/1.1\r\nhost: maas-extproc-authz\r\n"
        f"x-maas-status: {status}\r\n{size}content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body  # header bytes as they are (latin-1 is 1:1)


async def ledger_total(server: Server, model: str) -> int:
    day = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")
    rows = await server.sidecar.store.ledger("bob", [day])
    return sum(row.total_tokens for row in rows if row.model == model)


def duplicates(server: Server) -> float:
    return server.sidecar.metrics.settle_duplicates._value.get()  # type: ignore[no-any-return]


async def test_a_reported_total_is_settled_before_the_answer(server: Server) -> None:
    billing = await admitted(server, "m-settle")
    usage = '{"prompt_tokens":8,"completion_tokens":12,"total_tokens":20}'
    ((status, _, _),) = await exchange(server, settle(billing, usage))
    assert status == 200
    assert await ledger_total(server, "m-settle") == 20  # already there when the answer left


@pytest.mark.parametrize(
    "usage",
    [
        "",  # the filter sends nothing when Envoy read no usage; here: an empty line
        '{"prompt_tokens":8}',  # partial: the estimate needs the bytes the access log has
        '{"total_tokens":-5}',  # untrusted
        '{"total_tokens":1.0000000000000000e+30}',
        '{"total_tokens":"20"}',
        "[1,2]",
        "{not json",
        "[" * 5000 + "]" * 5000,
    ],
)
async def test_what_is_not_a_reported_total_is_left_to_the_access_log(
    server: Server, usage: str
) -> None:
    billing = await admitted(server, "m-later")
    ((status, _, _),) = await exchange(server, settle(billing, usage))
    assert status == 204
    assert await ledger_total(server, "m-later") == 0


@pytest.mark.parametrize(
    ("usage", "status", "charged"),
    [
        ("", "200", 8),  # none read: 400 bytes estimated, cut to the reservation
        ('{"total_tokens":-5}', "200", 8),  # untrusted: the capped estimate
        ("", "500", 0),  # an upstream error without usage costs nothing
        ('{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}', "200", 3),
    ],
)
async def test_a_body_with_its_size_is_always_charged_here(
    server: Server, usage: str, status: str, charged: int
) -> None:
    """Not a stream: the filter counted the body, so the estimate needs no access log."""
    billing = await admitted(server, f"m-body-{status}-{len(usage)}")
    ((answer, _, _),) = await exchange(server, settle(billing, usage, status, sent="400"))
    assert answer == 200
    assert await ledger_total(server, f"m-body-{status}-{len(usage)}") == charged


def settle_body(billing: str, raw: bytes, kind: str, coding: str = "") -> bytes:
    """``POST /settle`` with the body Envoy read no usage in: the filter's third part, after an
    empty usage line, with the response's content type and coding as headers."""
    body = f"{billing}\n\n".encode() + raw
    head = (
        "POST /settle HTTP/1.1\r\nhost: maas-extproc-authz\r\nx-maas-status: 200\r\n"
        f"x-maas-bytes: {len(raw)}\r\nx-maas-body-type: {kind}\r\n"
        f"x-maas-body-encoding: {coding}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def invalid(server: Server, reason: str) -> float:
    counter = server.sidecar.metrics.usage_invalid.labels(reason)
    return counter._value.get()  # type: ignore[no-any-return]


def gzip_bomb(inflated: int) -> bytes:
    """A gzip body of ``inflated`` zero bytes after a JSON start (what a hostile upstream sends)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = packer.compress(b'{"usage":{"total_tokens":1},"pad":"')
    for _ in range(inflated >> 20):
        out += packer.compress(b"0" * (1 << 20))
    return out + packer.flush()


TEXT = '"choices":[{"message":{"content":"sixteen chars ok"}}]'  # 4 tokens at 4 a token


@pytest.mark.parametrize(
    ("raw", "coding", "reason", "charged"),
    [
        # A count Envoy's JSON parser refuses: read here, untrusted; prompt (1) + text (4).
        (f'{{{TEXT},"usage":{{"total_tokens":1{"0" * 400}}}}}'.encode(), "", "too_large", 5),
        # Inflated here until the cap: untrusted, and no text was read before it (prompt: 1).
        (gzip_bomb(64 << 20), "gzip", "decompression_bomb", 1),
        # Compressed but honest: inflated here and charged exactly.
        (
            gzip.compress(b'{"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}'),
            "gzip",
            None,
            5,
        ),
        (f"{{{TEXT}}}".encode(), "", None, 5),  # no usage: an estimate, as full makes it
    ],
)
async def test_a_body_envoy_could_not_read_is_read_here(
    server: Server, raw: bytes, coding: str, reason: str | None, charged: int
) -> None:
    """As ext_proc's session reads it in `full`: the same charge and the same invalid count."""
    model = f"m-raw-{reason}-{len(raw)}"
    billing = await admitted(server, model, messages=[{"role": "user", "content": "hi"}])
    before = invalid(server, reason) if reason else 0.0
    request = settle_body(billing, raw, "application/json", coding)
    ((answer, _, _),) = await exchange(server, request)
    assert answer == 200
    assert await ledger_total(server, model) == charged
    if reason:
        assert invalid(server, reason) == before + 1


@pytest.mark.parametrize(
    ("billing", "status"),
    [
        ("not a record", "200"),
        ('{"user":"bob"}', "200"),
        (None, "2000"),
        (None, "ok"),
        (None, "\u00b200"),  # "²00": a digit to str.isdigit(), not to int()
    ],
)
async def test_a_body_that_is_not_ours_is_a_400(
    server: Server, billing: str | None, status: str
) -> None:
    record = billing if billing is not None else await admitted(server, "m-bad")
    ((answer, _, _),) = await exchange(server, settle(record, '{"total_tokens":3}', status))
    assert answer == 400


def record(
    billing: str, usage: str, *, flags: str = "-", sent: str = "120", sample: str = "-"
) -> logs_pb2.LogRecord:
    """One log record as Envoy 1.40 formats usage_access_log's attributes: strings throughout."""
    authz = json.dumps({"ext_authz_duration": 1, handover.BILLING_HEADER: billing})
    out = logs_pb2.LogRecord(time_unix_nano=1)
    for key, value in (
        ("authz", authz),
        ("usage", usage),
        ("status", "200"),
        ("flags", flags),
        ("bytes", sent),
        ("type", "DownstreamEnd"),
        ("sample", sample),
    ):
        attribute = out.attributes.add()
        attribute.key = key
        attribute.value.string_value = value
    return out


async def export(server: Server, *records: logs_pb2.LogRecord) -> None:
    request = logs_service_pb2.ExportLogsServiceRequest()
    request.resource_logs.add().scope_logs.add().log_records.extend(records)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = logs_service_pb2_grpc.LogsServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.Export(request, timeout=5)


async def test_an_export_is_answered_once_its_charges_are_settled(server: Server) -> None:
    reported = await admitted(server, "m-otlp")
    left = await admitted(server, "m-left")
    await export(
        server,
        record(reported, '{"completion_tokens":12,"prompt_tokens":8,"total_tokens":20}'),
        record(left, "-", flags="DC", sent="400"),  # a client that left: the bytes, capped
    )
    assert await ledger_total(server, "m-otlp") == 20
    assert 0 < await ledger_total(server, "m-left") <= 8 + 2  # the reservation caps it


async def test_a_stream_cut_short_counts_the_sampled_share_of_the_bytes_as_text(
    server: Server,
) -> None:
    """The settle filter sampled a 180-byte event with 6 characters of text: 1800 bytes sent
    stand for 60 characters, 15 tokens, not 450 (then cut to the reservation)."""
    billing = await admitted(server, "m-sampled")
    sample = '{"event_bytes":180,"text_chars":6}'
    await export(server, record(billing, "-", flags="DC", sent="1800", sample=sample))
    day = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")
    (row,) = [r for r in await server.sidecar.store.ledger("bob", [day]) if r.model == "m-sampled"]
    assert row.completion_tokens == 8  # 15 from the text, cut to max_tokens
    billing = await admitted(server, "m-few")
    await export(server, record(billing, "-", flags="DC", sent="360", sample=sample))
    (row,) = [r for r in await server.sidecar.store.ledger("bob", [day]) if r.model == "m-few"]
    assert row.completion_tokens == 3  # 12 characters: 3 tokens (90 from the bytes alone)


@pytest.mark.parametrize(
    "sample",
    ['{"event_bytes":0,"text_chars":6}', '{"event_bytes":5,"text_chars":6}', '"x"', "[1]", "-"],
)
async def test_a_sample_that_cannot_be_a_share_leaves_the_bytes(
    server: Server, sample: str
) -> None:
    billing = await admitted(server, "m-odd")
    await export(server, record(billing, "-", flags="DC", sent="360", sample=sample))
    day = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%d")
    (row,) = [r for r in await server.sidecar.store.ledger("bob", [day]) if r.model == "m-odd"]
    assert row.completion_tokens == 8  # 90 from the bytes, cut to max_tokens


async def test_a_batch_delivered_twice_is_charged_once(server: Server) -> None:
    """Envoy resends a batch whose call was reset: the settle's request id makes it free."""
    billing = await admitted(server, "m-twice")
    one = record(billing, '{"total_tokens":7,"prompt_tokens":2,"completion_tokens":5}')
    before = duplicates(server)
    await asyncio.gather(export(server, one), export(server, one))
    await export(server, one)
    assert await ledger_total(server, "m-twice") == 7
    assert duplicates(server) == before + 2


async def test_records_that_are_not_ours_are_skipped(server: Server) -> None:
    stray = logs_pb2.LogRecord(time_unix_nano=1)
    stray.attributes.add(key="authz").value.string_value = "-"
    periodic = record(await admitted(server, "m-periodic"), '{"total_tokens":3}')
    (kind,) = [a for a in periodic.attributes if a.key == "type"]
    kind.value.string_value = "DownstreamPeriodic"
    await export(server, stray, periodic)
    assert await ledger_total(server, "m-periodic") == 0


@pytest.fixture
async def hiding_server() -> AsyncIterator[Server]:
    port = free_port()
    config = local_config(
        {
            "MAAS_EXTPROC_SERVER_AUTHZ_HTTP_PORT": str(port),
            "MAAS_EXTPROC_ACCOUNTING_HIDE_INJECTED_USAGE": "true",
        }
    )
    srv = Server(Sidecar.build(config), "127.0.0.1", 0)
    await srv.start()
    yield srv
    await srv.stop(1)


async def test_only_a_rewritten_stream_is_marked_for_hiding(hiding_server: Server) -> None:
    """accounting.hide_injected_usage: the settle filter drops the usage chunk of the streams
    admission rewrote (x-maas-hide-usage into metadata), never one the client asked for."""
    rewritten = b'{"model": "m", "max_tokens": 8, "stream": true}'
    asked = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    (first, mark, _), (second, plain, _) = await exchange(
        hiding_server, check(KEYS["premium"], rewritten), check(KEYS["premium"], asked)
    )
    assert (first, second) == (200, 200)
    assert mark["x-maas-hide-usage"] == "1"
    assert "x-maas-hide-usage" not in plain


async def test_without_hiding_nothing_is_marked(server: Server) -> None:
    body = b'{"model": "m", "max_tokens": 8, "stream": true}'
    ((status, headers, _),) = await exchange(server, check(KEYS["premium"], body))
    assert status == 200
    assert headers["x-maas-inject"] == "1"
    assert "x-maas-hide-usage" not in headers


def test_a_settle_reports_the_time_since_admission_in_whole_ms_at_least_1() -> None:
    """gen_ai.server.request.duration in `lean`: 0 means "no duration", so a response faster
    than a millisecond reads 1; without an admission clock there is none."""
    now_ms = int(time.time() * 1000)
    assert since_admission(0) == 0
    assert since_admission(now_ms + 5) == 1  # both ends in whole ms: never 0 or negative
    assert 250 <= since_admission(now_ms - 250) < 1250
