"""The ops console over real HTTP (uvicorn on 127.0.0.1), reading the real broker: who gets in,
what the session cookie and every page promise, and the overview read through the operators' code.

- every page but the login sends a browser without a session to the login, and the login keeps
  it on this console (no redirect to another site);
- a wrong password is refused without saying whether the name exists; a tampered or expired
  cookie is no session;
- the session cookie is HttpOnly and SameSite=Strict, every page carries the security headers;
- a change (here: logging out) without the session's CSRF token, or from another origin, is 403;
- the overview shows the broker's consumer groups (lag) and says which part could not be read
  (no order-status view runs here) instead of failing.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest

from conftest import settings_for
from console_server import csrf_of, serve_console, sessions, users
from console_server import logged_in as log_in
from services.console.auth import COOKIE, Users, hash_password

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PASSWORDS = {"ada": "correct horse", "vic": "battery staple"}


@pytest.fixture
def console(kafka_bootstrap):
    with serve_console(settings_for(kafka_bootstrap), users(ada=("operator", PASSWORDS["ada"]),
                                                          vic=("viewer", PASSWORDS["vic"]))) as url:
        yield SimpleNamespace(url=url)  # no order-status view answers here


@contextmanager
def logged_in(console, name: str):
    with log_in(console.url, name, PASSWORDS[name]) as client:
        yield client


def test_pages_need_a_login_and_the_login_stays_on_this_console(console):
    with httpx.Client(base_url=console.url, timeout=30) as anonymous:
        for path in ("/", "/overview/panels", "/api/overview"):
            answer = anonymous.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == f"/login?next={path}"
        assert "Log in" in anonymous.get("/login").text
        elsewhere = anonymous.post("/login", data={"name": "ada", "password": PASSWORDS["ada"],
                                                   "next": "https://evil.example/"})
        assert elsewhere.status_code == 303 and elsewhere.headers["location"] == "/"


def test_a_wrong_password_or_name_is_refused_alike(console):
    with httpx.Client(base_url=console.url, timeout=30) as client:
        for name, password in (("ada", "wrong"), ("nobody", "wrong")):
            answer = client.post("/login", data={"name": name, "password": password, "next": "/"})
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login?failed=1")
            assert COOKIE not in answer.cookies
        assert "Wrong name or password." in client.get("/login?failed=1").text


def test_the_session_cookie_and_the_headers_promise_what_they_should(console):
    with httpx.Client(base_url=console.url, timeout=30) as client:
        answer = client.post("/login", data={"name": "vic", "password": PASSWORDS["vic"], "next": "/"})
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
        page = client.get("/")
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"

        value = client.cookies[COOKIE]
        body, _, signature = value.rpartition(".")
        tampered = body.replace(body[-2], "A" if body[-2] != "A" else "B") + "." + signature
        for bad in (tampered, value[:-1] + ("0" if value[-1] != "0" else "1"), "garbage"):
            with httpx.Client(base_url=console.url, timeout=30, cookies={COOKIE: bad}) as forged:
                assert forged.get("/").status_code == 303
    expired = sessions(hours=-1)
    _, old = expired.new(Users(f"ada:operator:{hash_password('x')}").login("ada", "x"))
    with httpx.Client(base_url=console.url, timeout=30, cookies={COOKIE: old}) as stale:
        assert stale.get("/").status_code == 303


def test_a_change_needs_the_sessions_csrf_token_and_this_origin(console):
    with logged_in(console, "vic") as client:
        token = csrf_of(client.get("/").text)
        assert client.post("/logout", data={}).status_code == 403
        assert client.post("/logout", data={"csrf": "not-it"}).status_code == 403
        assert client.post("/logout", data={"csrf": token},
                           headers={"origin": "https://evil.example"}).status_code == 403
        assert client.get("/").status_code == 200, "a refused change must not end the session"
        out = client.post("/logout", data={"csrf": token})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert client.get("/").status_code == 303


def test_the_overview_reads_the_broker_and_says_what_it_could_not_read(console):
    with logged_in(console, "ada") as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "ada (operator)" in page.text
        for panel in ("Open alerts", "Orders per state now", "Lag per group", "Held keys", "Dead letters"):
            assert panel in page.text
        assert "order-status view" in page.text and "is not answering" in page.text  # no view runs here
        data = client.get("/api/overview").json()
        assert {"inventory", "email", "invoice", "analytics", "order-status"} <= set(data["lag"])
        assert not [p for p in data["problems"] if p.startswith("Kafka")], data["problems"]
        assert '<script src="/static/live.js">' in page.text
        assert client.get("/static/live.js").headers["content-type"].startswith("text/javascript")
