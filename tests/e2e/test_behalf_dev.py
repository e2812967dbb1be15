"""`behalf dev` in a subprocess: the README's first command, walked through end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.forms import walk

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def free_port_block() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 60000:
            continue
        ok = True
        for offset in (1, 2):
            with socket.socket() as other:
                try:
                    other.bind(("127.0.0.1", port + offset))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port block")


@pytest.fixture
def dev_server(tmp_path):
    port = free_port_block()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}
    env["PYTHONPATH"] = str(ROOT)
    log = (tmp_path / "dev.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "behalf.cli", "dev", "--port", str(port)],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail((tmp_path / "dev.log").read_text())
    yield base, tmp_path, env, process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("behalf dev did not stop on Ctrl-C")


def test_a_newcomer_connects_runs_reads_the_trail_and_revokes(dev_server):
    base, workdir, env, _ = dev_server
    with httpx.Client(timeout=10) as browser:
        # connect the example agent as alice through the sandbox AS
        page = walk(browser, f"{base}/connect/reporting-agent", username="alice",
                    password="demo", stop_at=f"{base}/grants")
        assert page.status_code == 200 and "reporting-agent" in page.text
        grants = browser.get(f"{base}/api/grants").json()
        (grant,) = grants["grants"]
        assert grant["status"] == "active"

        # run the example job now, from the CLI, as a second terminal would
        run = subprocess.run([sys.executable, "-m", "behalf.cli", "run", "nightly-report",
                              "--user", "alice", "--agent", "reporting-agent", "--json"],
                             cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr

        def runs():
            listing = subprocess.run([sys.executable, "-m", "behalf.cli", "runs", "list",
                                      "--json"], cwd=workdir, env=env, capture_output=True,
                                     text=True, timeout=60)
            return __import__("json").loads(listing.stdout)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and runs()[0]["status"] != "succeeded":
            time.sleep(0.5)
        assert runs()[0]["status"] == "succeeded"

        # the agent's calls are in the user's trail
        grants = browser.get(f"{base}/api/grants").json()
        (grant,) = grants["grants"]
        text = str(grant)
        assert "/v2/reports" in text or "api:call" in text

        # revoke from the grants API (CSRF header from the listing)
        answer = browser.post(f"{base}/api/grants/{grant['id']}/revoke",
                              headers={"X-CSRF-Token": grants["csrf_token"],
                                       "Origin": base})
        assert answer.status_code == 200, answer.text
        (grant,) = browser.get(f"{base}/api/grants").json()["grants"]
        assert grant["status"] == "revoked"
