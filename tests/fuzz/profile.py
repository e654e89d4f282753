"""Hypothesis settings for the fuzz properties, picked by ``MAAS_FUZZ_PROFILE``.

``ci`` (the default, in ``make test``) runs a few seconds per property; ``long`` (``make fuzz``)
runs thousands of examples. Both share one sidecar per property rather than one per example,
hence the function-scoped-fixture health check is off.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("maas-ci", max_examples=40, deadline=None, suppress_health_check=_QUIET)
settings.register_profile(
    "maas-long", max_examples=3000, deadline=None, suppress_health_check=_QUIET
)

_CHOSEN = os.environ.get("MAAS_FUZZ_PROFILE", "ci")
if _CHOSEN not in ("ci", "long"):
    raise ValueError(f"MAAS_FUZZ_PROFILE: expected ci or long, got {_CHOSEN!r}")
FUZZ = settings.get_profile(f"maas-{_CHOSEN}")
