"""Kuadrant's RateLimitService stubs generated from protos/, or an error saying to run make protos."""

from __future__ import annotations

try:
    from extproc._gen.kuadrant.service.ratelimit.v1 import ratelimit_pb2_grpc
except ImportError as exc:  # a fresh clone before `make install`
    raise ImportError(
        "the generated Kuadrant rate-limit service (extproc/_gen/) is missing: run `make protos`"
    ) from exc

SERVICE_NAME = "kuadrant.service.ratelimit.v1.RateLimitService"
RateLimitServiceStub = ratelimit_pb2_grpc.RateLimitServiceStub
RateLimitServiceServicer = ratelimit_pb2_grpc.RateLimitServiceServicer
add_servicer_to_server = ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server

__all__ = [
    "SERVICE_NAME",
    "RateLimitServiceServicer",
    "RateLimitServiceStub",
    "add_servicer_to_server",
]
