"""Prometheus metrics and the usage query API."""
