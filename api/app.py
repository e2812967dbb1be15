"""The app factory: one FastAPI app, HTML pages for people and JSON under `/api`."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from api import health


def create_app(*, sessions: sessionmaker[Session]) -> FastAPI:
    app = FastAPI(title="behalf", version="0.1.0", docs_url="/api/docs", redoc_url=None)
    app.state.sessions = sessions
    app.include_router(health.router)
    return app
