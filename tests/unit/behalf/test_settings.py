from pathlib import Path

import pytest

from behalf import settings
from behalf.settings import KNOWN_VARIABLES, SettingsError, load

PRODUCTION = {
    "BEHALF_ENV": "production",
    "BEHALF_DATABASE_URL": "postgresql://behalf@db/behalf",
    "BEHALF_REDIS_URL": "redis://redis:6379/0",
    "BEHALF_BROKER_URL": "redis://redis:6379/1",
    "BEHALF_KMS_KEY_ID": "alias/behalf",
    "BEHALF_SECRET_KEY": "x" * 40,
}


def test_defaults_are_the_embedded_dev_setup():
    s = load({})
    assert s.env == "dev"
    assert s.database_url.startswith("sqlite:")
    assert s.uses_local_key
    assert s.redis_url == "memory://"
    assert s.local_key_file == Path(".behalf/dev-master.key")


def test_values_are_parsed():
    s = load({"BEHALF_JOBS_MODULES": "a.jobs, b.more_jobs", "BEHALF_REFRESH_SKEW_SECONDS": "90"})
    assert s.jobs_modules == ("a.jobs", "b.more_jobs")
    assert s.refresh_skew_seconds == 90


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BEHALF_REFRESH_SKEW_SECONDS", "abc"),
        ("BEHALF_REFRESH_SKEW_SECONDS", "-5"),
        ("BEHALF_DATABASE_URL", "mysql://x"),
        ("BEHALF_REDIS_URL", "http://x"),
        ("BEHALF_ENV", "staging"),
        ("BEHALF_JOBS_MODULES", "not a module"),
        ("BEHALF_LOG_LEVEL", "LOUD"),
        ("BEHALF_NO_SUCH_THING", "1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(name, value):
    with pytest.raises(SettingsError) as info:
        load({name: value})
    message = str(info.value)
    assert message.startswith(name + ":")
    assert "\n" not in message


def test_production_accepts_real_services():
    assert load(PRODUCTION).production


@pytest.mark.parametrize(
    ("name", "dev_value"),
    [
        ("BEHALF_KMS_KEY_ID", ""),
        ("BEHALF_REDIS_URL", "memory://"),
        ("BEHALF_BROKER_URL", "memory://"),
        ("BEHALF_DATABASE_URL", "sqlite:///x.db"),
        ("BEHALF_SECRET_KEY", "short"),
    ],
)
def test_production_refuses_each_dev_only_default(name, dev_value):
    environ = dict(PRODUCTION)
    environ[name] = dev_value
    with pytest.raises(SettingsError, match=f"^{name}:"):
        load(environ)


def test_every_setting_is_documented():
    rows = settings.describe()
    assert {r[0] for r in rows} == KNOWN_VARIABLES
    assert all(r[2] for r in rows)
