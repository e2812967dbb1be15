"""A real headless Chromium for the browser tests: Debian's `/usr/bin/chromium` driven by
Playwright through `executable_path` (browsers cannot be downloaded here, and `playwright
install` is never run). Missing Chromium or Playwright skips locally and fails in CI.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.overrides import override
from tests.support.services import unavailable

CHROMIUM = override("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEFAULT_TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One Chromium process per test module (a fresh context per test: no shared cookies).

    Not per session: Playwright's sync API keeps an asyncio loop in the main thread while it
    runs, which would break every later test that runs a loop of its own (anyio, asyncio).
    """
    executable = CHROMIUM if os.path.isabs(CHROMIUM) else shutil.which(CHROMIUM)
    if not executable or not os.access(executable, os.X_OK):
        unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        unavailable(f"the playwright package is missing: {exc}")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS,
                                                 headless=True, timeout=DEFAULT_TIMEOUT_MS)
        except Error as exc:
            unavailable(f"Chromium did not start: {str(exc).splitlines()[0]}")
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A new browser context (its own cookie jar) and page, closed after the test."""
    context = chromium.new_context()
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()
