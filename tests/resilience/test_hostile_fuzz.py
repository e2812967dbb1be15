"""Property-based fuzzing of the JSON API from its own OpenAPI schema (schemathesis 4).

The app is served over HTTP on real PostgreSQL, in front of the real AS (as in
tests/integration/test_connect.py), with a connected user, a queued run and an audit trail, so
the generated requests reach real rows. Every operation of `/openapi.json` is fuzzed with valid
(positive) and invalid (negative) data, signed in as a user and holding the operator token: no
answer may be a 5xx, and every answer must match the schema the app publishes. Bounded in
examples per operation and in time; derandomised, so CI sees the same requests every run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

import api.app
from api.deps import ApiDeps
from delegation.runs import queue_run
from models import Delegation
from tests.integration import connect_support
from tests.integration.connect_support import ConnectWorld

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

OPS_TOKEN = "hostile-ops-token-" + "o" * 24
EXAMPLES = 40  # per operation and generation mode
BUDGET_SECONDS = 40.0  # per generation mode, all operations together
POSITIVE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                   response_schema_conformance]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, oidc_provider: Any, pg_sessions: Any,
          tmp_path: Any, leak_scan: Any) -> Iterator[ConnectWorld]:
    """The connect world, its app also serving the operator API (`/api/ops`)."""
    def with_ops(deps: ApiDeps) -> Any:
        return api.app.create_app(dataclasses.replace(deps, ops_token=OPS_TOKEN))

    monkeypatch.setattr(connect_support, "create_app", with_ops)
    yield from connect_support.build_world(oidc_provider, pg_sessions, tmp_path, leak_scan)


@dataclasses.dataclass
class Tally:
    sent: int = 0
    server_errors: int = 0
    by_status: dict[int, int] = dataclasses.field(default_factory=dict)


def _seed(world: ConnectWorld) -> httpx.Client:
    """Alice connected (a delegation, audit events) with one run queued; her browser."""
    alice = world.browser()
    world.sign_in(alice, "alice")
    assert world.connect(alice, "alice").status_code == 303
    (row,) = world.delegations()
    world.tokens(row)  # (registered for the leak scan)
    with world.sessions.begin() as s:
        delegation = s.scalars(select(Delegation)).one()
        queue_run(s, job="nightly-report", user_id=delegation.user_id,
                  agent_id=delegation.agent_id, now=world.clock.now())
    return alice


def _fuzz(world: ConnectWorld, mode: schemathesis.GenerationMode) -> Tally:
    alice = _seed(world)
    cookies = {"behalf_session": alice.cookies.get("behalf_session", path="/")}
    published = alice.get(f"{world.url}/openapi.json")  # (httpx: no proxy from the env)
    schema = schemathesis.openapi.from_dict(published.json())
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    # The schema names the JSON surface; if it shrinks, this test must be looked at again.
    assert {"GET /api/grants", "POST /api/grants/{grant_id}/revoke", "GET /api/audit",
            "GET /api/ops/runs", "GET /api/ops/delegations", "POST /api/ops/requeue",
            "GET /healthz"} <= labels, labels
    tally = Tally()
    deadline = time.monotonic() + BUDGET_SECONDS
    checks = list(POSITIVE_CHECKS)
    if not mode.is_positive:
        checks.append(negative_data_rejection)
    http = requests.Session()
    http.trust_env = False

    for operation in operations:
        inputs = (operation.path_parameters, operation.headers, operation.cookies,
                  operation.query, operation.body)
        if not mode.is_positive and not any(len(part) for part in inputs):
            continue  # nothing to make invalid (GET /healthz, GET /api/grants)
        strategy = operation.as_strategy(generation_mode=mode)

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case: Any) -> None:
            if time.monotonic() > deadline:
                return
            headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
            response = case.call(base_url=world.url, session=http, headers=headers,
                                 cookies=cookies, timeout=15, allow_redirects=False)
            tally.sent += 1
            tally.by_status[response.status_code] = \
                tally.by_status.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                tally.server_errors += 1
            # nothing the client holds is reflected (a 422 names the field, not its value)
            assert OPS_TOKEN not in response.text
            assert cookies["behalf_session"] not in response.text
            case.validate_response(response, checks=checks, headers=headers)

        run()
    http.close()
    return tally


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE,
                                  schemathesis.GenerationMode.NEGATIVE])
def test_every_operation_answers_within_its_schema_and_never_5xx(
        world: ConnectWorld, mode: schemathesis.GenerationMode) -> None:
    tally = _fuzz(world, mode)
    print(f"\nschemathesis {mode.value}: {tally.sent} requests, {tally.server_errors} 5xx, "
          f"statuses {dict(sorted(tally.by_status.items()))}")
    assert tally.server_errors == 0
    assert tally.sent >= 7 * 10  # every operation was really exercised
    # Whatever was fuzzed, alice's delegation is still hers and active.
    (row,) = world.delegations()
    assert row.status == "active"
