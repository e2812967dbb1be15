"""Build the HTTP app from `Deps` (used by `behalf api` and `behalf dev`)."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from behalf.deps import Deps


def build_api(deps: Deps) -> FastAPI:
    return create_app(sessions=deps.sessions)
