"""Test-only service overrides (`BEHALF_TEST_*`), taken out of the environment when the tests
start: the product's settings refuse unknown `BEHALF_*` names, and must never see these."""

from __future__ import annotations

import os

OVERRIDES = {name: os.environ.pop(name) for name in list(os.environ)
             if name.startswith("BEHALF_TEST_")}


def override(name: str, default: str) -> str:
    """`BEHALF_TEST_<name>` as given when the tests started, else `default`."""
    return OVERRIDES.get(f"BEHALF_TEST_{name}", default)
