"""What the web UI's test files share: an API login as a session a test
can use over HTTPS (and hand to a browser), and the wait until the mail a
fixture sent is in the archive."""

from __future__ import annotations

import time


def api_login(stack, tenant: str | None, username: str, password: str):
    """POST /api/v1/login; the tests/test_api.Client holding the session
    (cookie, csrf, principal)."""
    from tests.test_api import Client
    c = Client(stack)
    deadline = time.monotonic() + 30
    while True:
        r = c.request("POST", "/api/v1/login", {"tenant": tenant, "username": username, "password": password})
        # A daemon just started answers 503 until it has the access key.
        if r.status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status == 200, r.data
    cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie" and v.startswith("mt_session=")][0]
    c.cookie, c.csrf = cookie.split(";", 1)[0].split("=", 1)[1], r.json()["csrf"]
    c.principal = r.json()["principal"]
    return c


def wait_archived(client, total: int, stack, *, query: str = "", limit: int = 100, timeout: float = 90.0) -> dict:
    """Poll the API's search as CLIENT until QUERY has TOTAL matches (the
    archiver has stored what the fixture sent); the last answer."""
    import urllib.parse
    path = "/api/v1/search?" + urllib.parse.urlencode({"q": query, "limit": limit})
    deadline = time.monotonic() + timeout
    while True:
        a = client.request("GET", path)
        if a.status == 200 and a.json()["total"] == total:
            return a.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"mail not archived: {a.data[:300]}\n{stack.log()[-3000:]}")
        time.sleep(0.3)
