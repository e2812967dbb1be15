"""Build the HTTP app from `Deps` (used by `behalf api` and `behalf dev`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from api.app import create_app
from api.deps import ApiDeps, CookieSettings
from behalf.deps import Deps
from behalf.relay import publish_stop_now
from behalf.runtime import oauth_client
from behalf.settings import Settings

log = logging.getLogger(__name__)

DEV_SIGNING_KEY_FILE = "secret-key"


def build_api(deps: Deps) -> FastAPI:
    return create_app(api_deps(deps))


def api_deps(deps: Deps) -> ApiDeps:
    settings = deps.settings
    api = ApiDeps(
        sessions=deps.sessions,
        vault=deps.vault,
        clock=deps.clock,
        oauth=oauth_client(deps),
        public_url=settings.public_url,
        secret_key=secret_key(settings),
        environment=settings.env,
        cookies=CookieSettings.for_url(settings.public_url),
        ops_token=settings.ops_token,
    )
    publish_stop: Callable[[uuid.UUID], None] | None = deps.extras.get("publish_stop")
    if publish_stop is None:
        def publish_stop(delegation_id: uuid.UUID) -> None:
            publish_stop_now(deps, delegation_id, "delegation_revoked")
    return dataclasses.replace(api, publish_stop=publish_stop)


def secret_key(settings: Settings) -> str:
    """`BEHALF_SECRET_KEY`; in dev, when empty, one generated once and kept (mode 0600) next
    to the local key file, so cookies and pending sign-ins survive a restart."""
    if settings.secret_key:
        return settings.secret_key
    if settings.production:  # settings.load refuses this already; never guess in production
        raise ValueError("BEHALF_SECRET_KEY is required in production")
    path = Path(settings.local_key_file).parent / DEV_SIGNING_KEY_FILE
    try:
        value = path.read_text().strip()
        if len(value) >= 32:
            return value
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.chmod(path, 0o600)
    log.warning("generated a dev-only secret key in %s (set BEHALF_SECRET_KEY in production)",
                path)
    return value
