"""Keep the AS's answers out of access logs: the callbacks' query strings carry an
authorisation code and a state, which a server's access log would otherwise write down."""

from __future__ import annotations

import logging

CALLBACK_PATHS = ("/oauth/callback", "/auth/callback")


class RedactCallbackQueries(logging.Filter):
    """Rewrites uvicorn access records (`client, method, path?query, version, status`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, _, query = args[2].partition("?")
            if query and path in CALLBACK_PATHS:
                record.args = (*args[:2], f"{path}?<redacted>", *args[3:])
        return True


def install(logger_name: str = "uvicorn.access") -> None:
    """Add the filter once (creating apps again in one process does not stack filters)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactCallbackQueries) for f in logger.filters):
        logger.addFilter(RedactCallbackQueries())
