"""The exception tree of maas-extproc.

A denial is a ``Decision`` value, never an exception; exceptions are for broken configuration and
for dependencies that failed. Transient failures derive from ``Unavailable`` so that one place
(``envoy.replies``) maps them to 503 / gRPC UNAVAILABLE and the configured failure policy decides.

    MaasError
    ├── ConfigError             a setting is missing or malformed (names the key and what it expected)
    └── Unavailable             a dependency did not answer; retrying later may succeed
        ├── StoreUnavailable    the counter store (Redis) failed
        ├── IdentityUnavailable the identity source (Kubernetes API) failed
        ├── TierUnavailable     the tier source (ConfigMap, maas-api) failed
        ├── PlanUnavailable     subscription selection (maas-api, the watched objects) failed
        └── AccessUnavailable   the model access check (SubjectAccessReview) failed
"""

from __future__ import annotations


class MaasError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(MaasError):
    """Invalid configuration; the message names the offending key and the value expected."""

    def __init__(self, key: str, expected: str, got: object = None) -> None:
        self.key = key
        self.expected = expected
        shown = "" if got is None else f", got {got!r}"
        super().__init__(f"{key}: expected {expected}{shown}")


class Unavailable(MaasError):
    """A dependency failed in a way that may pass; the failure policy decides what to answer."""


class StoreUnavailable(Unavailable):
    """The counter store could not be reached or answered with an error."""


class IdentityUnavailable(Unavailable):
    """The identity source could not validate a token right now."""


class TierUnavailable(Unavailable):
    """The tier source could not resolve a tier right now."""


class PlanUnavailable(Unavailable):
    """The subscription a request runs under could not be selected right now."""


class AccessUnavailable(Unavailable):
    """The model access check could not be answered right now."""
