"""Test-suite wide settings: hypothesis profiles and the CPU-only guard."""

import os

from hypothesis import HealthCheck, settings

# CI runs the "ci" profile (thousands of property cases in all); "dev" is quicker locally.
settings.register_profile(
    "ci", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
