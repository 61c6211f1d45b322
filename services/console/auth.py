"""Who may use the console, and how a browser proves it on every request.

- Users come from configuration (ORDERPIPE_CONSOLE_USERS: `name:role:hash,...`), each with a role:
  `viewer` reads every page, `operator` may also change something (replay, purge, cancel). The
  hash is scrypt with a salt of its own (`hash_password`, `orderpipe console hash-password`); the
  configuration never holds a password.
- A login gives a session cookie: the user, the role, a CSRF token and the expiry, signed with
  HMAC-SHA256 (ORDERPIPE_CONSOLE_SECRET). It is HttpOnly (no script reads it), SameSite=Strict
  (no other site's page sends it along) and, behind TLS, Secure.
- Every change is a POST that carries the session's CSRF token in its form, and whose Origin, when
  the browser sends one, is the console's own; a change without both is refused (403).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

ROLES = ("viewer", "operator")
COOKIE = "orderpipe_console"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class BadUsers(ValueError):
    """ORDERPIPE_CONSOLE_USERS cannot be read: the message says which entry and why."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def may_change(self) -> bool:
        return self.role == "operator"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` (base64): what a user entry's third field holds."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, maxmem=64 * 2**20, **_SCRYPT)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt)}${b64(digest)}"


def _matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=64 * 2**20)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


class Users:
    def __init__(self, entries: str):
        self._hashes: dict[str, tuple[str, str]] = {}
        for n, entry in enumerate(e.strip() for e in entries.split(",")):
            if not entry:
                continue
            name, _, rest = entry.partition(":")
            role, _, stored = rest.partition(":")
            if not name or role not in ROLES or not stored.startswith("scrypt$"):
                raise BadUsers(f"ORDERPIPE_CONSOLE_USERS entry {n + 1} ({name or '?'}): expected name:role:hash with "
                               f"role viewer or operator and a hash from `orderpipe console hash-password`")
            self._hashes[name] = (role, stored)

    def __len__(self) -> int:
        return len(self._hashes)

    def login(self, name: str, password: str) -> User | None:
        role, stored = self._hashes.get(name, ("", "scrypt$16384$8$1$AAAA$AAAA"))  # same work for unknown names
        return User(name, role) if _matches(password, stored) and role else None


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    expires: float


class Sessions:
    """Signed, self-contained session cookies (nothing kept on the server)."""

    def __init__(self, secret: bytes, hours: float, secure: bool):
        self.secret, self.ttl_s, self.secure = secret, hours * 3600, secure

    def new(self, user: User) -> tuple[Session, str]:
        session = Session(user, secrets.token_urlsafe(24), time.time() + self.ttl_s)
        body = base64.urlsafe_b64encode(json.dumps(  # without padding: a cookie value needs no quoting
            {"u": user.name, "r": user.role, "c": session.csrf, "e": session.expires}).encode()).decode().rstrip("=")
        return session, f"{body}.{self._sign(body)}"

    def read(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            session = Session(User(data["u"], data["r"]), data["c"], float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() and session.user.role in ROLES else None

    def cookie_options(self) -> dict:
        return {"httponly": True, "samesite": "strict", "secure": self.secure, "max_age": int(self.ttl_s),
                "path": "/"}

    def _sign(self, body: str) -> str:
        return hmac.new(self.secret, body.encode(), hashlib.sha256).hexdigest()
