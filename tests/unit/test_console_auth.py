"""The console's users and sessions (services/console/auth.py): hashes verify only their own
password, a bad ORDERPIPE_CONSOLE_USERS says which entry and why, a session cookie is only good
unaltered, unexpired and signed with the same secret."""

from __future__ import annotations

import pytest

from services.console.auth import BadUsers, Sessions, Users, hash_password


def test_a_hash_verifies_its_password_only_and_each_has_its_own_salt():
    first, second = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert first != second and first.startswith("scrypt$")
    users = Users(f"ada:operator:{first},vic:viewer:{second}")
    assert users.login("ada", "s3cret-pass").role == "operator"
    assert users.login("vic", "s3cret-pass").role == "viewer"
    assert users.login("ada", "s3cret-pasS") is None
    assert users.login("nobody", "s3cret-pass") is None
    assert not users.login("vic", "s3cret-pass").may_change and users.login("ada", "s3cret-pass").may_change


@pytest.mark.parametrize("entries, where", [
    ("ada:admin:scrypt$1", "entry 1 (ada)"),
    (f"ada:viewer:{hash_password('x')},vic:viewer:plaintext", "entry 2 (vic)"),
    (":viewer:scrypt$x", "entry 1 (?)"),
])
def test_a_bad_users_setting_names_the_entry(entries, where):
    with pytest.raises(BadUsers) as refused:
        Users(entries)
    assert str(refused.value).startswith(f"ORDERPIPE_CONSOLE_USERS {where}: expected name:role:hash")


def test_a_session_is_only_good_unaltered_unexpired_and_with_the_same_secret():
    user = Users(f"ada:operator:{hash_password('pw')}").login("ada", "pw")
    sessions = Sessions(b"one", hours=1, secure=True)
    session, cookie = sessions.new(user)
    assert sessions.read(cookie) == session and "=" not in cookie
    body, _, signature = cookie.rpartition(".")
    assert sessions.read(body[:-1] + ("A" if body[-1] != "A" else "B") + "." + signature) is None
    assert Sessions(b"two", hours=1, secure=True).read(cookie) is None
    assert Sessions(b"one", hours=-1, secure=True).read(Sessions(b"one", hours=-1, secure=True).new(user)[1]) is None
    assert sessions.read(None) is None and sessions.read("no-dot") is None
    assert sessions.cookie_options()["secure"] is True and sessions.cookie_options()["samesite"] == "strict"
