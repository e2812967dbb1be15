"""Access logs never record the AS's answers (code, state)."""

from __future__ import annotations

import logging

from api.logs import RedactCallbackQueries, install


def _record(path: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                             '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5000", "GET", path, "1.1", 303), None)


def test_callback_queries_are_redacted() -> None:
    for path in ("/oauth/callback", "/auth/callback"):
        record = _record(f"{path}?code=SECRETCODE&state=SECRETSTATE")
        assert RedactCallbackQueries().filter(record)
        message = record.getMessage()
        assert "SECRET" not in message and f"{path}?<redacted>" in message


def test_other_paths_are_left_alone() -> None:
    record = _record("/grants?connected=reporter")
    RedactCallbackQueries().filter(record)
    assert "/grants?connected=reporter" in record.getMessage()


def test_install_is_idempotent() -> None:
    install("behalf.test.access")
    install("behalf.test.access")
    logger = logging.getLogger("behalf.test.access")
    assert sum(isinstance(f, RedactCallbackQueries) for f in logger.filters) == 1
