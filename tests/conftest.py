"""Shared fixtures. Settings come from code, never from the developer's environment."""

from __future__ import annotations

import os

import pytest

import tests.support.overrides  # noqa: F401  (takes BEHALF_TEST_* out first)
from delegation.clock import FrozenClock

for _name in [n for n in os.environ if n.startswith("BEHALF_")]:
    del os.environ[_name]

pytest_plugins = [
    "tests.support.databases",
    "tests.support.kms",
    "tests.support.oidc_fixtures",
    "tests.support.private_services",
    "tests.support.processes",
]


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()
