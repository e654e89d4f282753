"""Counter stores: the protocol, an in-memory and a Redis implementation."""
