"""The Envoy-facing gRPC services; the only package that imports Envoy protos."""
