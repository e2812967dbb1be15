"""`behalf.web`: the app built from settings, and the dev secret key."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

from behalf import settings as settings_module
from behalf.deps import Deps
from behalf.web import api_deps, build_api, secret_key


def _settings(tmp_path: Path, **env: str) -> settings_module.Settings:
    return settings_module.load({
        "BEHALF_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "BEHALF_LOCAL_KEY_FILE": str(tmp_path / "state" / "dev-master.key"),
        **env,
    })


def test_dev_secret_key_is_generated_once_private_and_reused(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    first = secret_key(settings)
    path = tmp_path / "state" / "secret-key"
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_key(settings) == first


def test_a_configured_secret_key_wins(tmp_path: Path) -> None:
    settings = _settings(tmp_path, BEHALF_SECRET_KEY="s" * 40)
    assert secret_key(settings) == "s" * 40
    assert not (tmp_path / "state" / "secret-key").exists()


def test_the_app_is_built_from_deps(tmp_path: Path) -> None:
    settings = _settings(tmp_path, BEHALF_PUBLIC_URL="https://behalf.example")
    deps = Deps.from_settings(settings)
    stops: list[object] = []
    deps.extras["publish_stop"] = stops.append
    try:
        api = api_deps(deps)
        assert api.cookies.secure is True  # https public URL
        assert api.environment == "dev"
        api.publish_stop(dataclasses.field)  # type: ignore[arg-type]
        assert stops == [dataclasses.field]
        paths = build_api(deps).openapi()["paths"]
        assert {"/healthz", "/api/grants", "/api/grants/{grant_id}/revoke"} <= set(paths)
    finally:
        deps.close()
