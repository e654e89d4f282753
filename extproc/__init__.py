"""maas-extproc: an Envoy ext_authz + ext_proc sidecar that meters LLM traffic."""

__version__ = "0.1.0"
