"""Shared pytest set-up: hypothesis profiles.

Profiles (select with HYPOTHESIS_PROFILE, default 'dev'; CI=true selects 'ci'):
    ci   derandomized, 200 examples per property, no deadline (first calls compile).
    dev  30 random examples per property, for a quick local loop.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=30, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
