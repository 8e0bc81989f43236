"""Who may write through the worklist, and the trail of what they wrote.

- **Users** are configured with ``cxr-triage users add NAME``; only an argon2 hash of the password is stored
  (argon2-cffi's defaults, RFC 9106's second recommended profile). There is no default user or password.
- **Sessions**: logging in sets an HttpOnly, SameSite=Strict cookie holding a random token (only its sha256 is
  stored) that expires after ``[web] session_hours``; ``secure_cookies`` adds the Secure flag for HTTPS.
- **CSRF**: every write carries the session's CSRF token (a hidden form field, or the ``X-CSRF-Token`` header of an
  API call) and, when the browser sends an ``Origin`` header, it must be this site's own. SameSite=Strict already
  keeps the cookie off cross-site requests; the token is the second line.
- **Networks**: ``[web] allowed_networks`` (CIDRs) limits who may use the page at all, reads included.
- **Audit**: one ``audit`` row per write (log in, failed log in, log out, feedback), with the user and address,
  and one when a logged-in user views a study (``study-viewed``; not again while they touched it a moment ago).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cxr_triage.core import db

COOKIE = "cxr_session"
MIN_PASSWORD_LENGTH = 10
_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash("timing-equaliser-for-unknown-users")


class AuthError(ValueError):
    """A user cannot be added or changed as asked (the message says why)."""


@dataclass(frozen=True)
class LoggedIn:
    username: str
    csrf_token: str


def _valid_username(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 64 or not all(ch.isalnum() or ch in "._-@" for ch in name):
        raise AuthError("a user name is 1 to 64 letters, digits or . _ - @")
    return name


def add_user(session: Session, username: str, password: str) -> db.User:
    username = _valid_username(username)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(db.User).where(db.User.username == username)) is not None:
        raise AuthError(f"user {username!r} exists already")
    user = db.User(username=username, password_hash=_HASHER.hash(password), created_at=db.utcnow())
    session.add(user)
    return user


def remove_user(session: Session, username: str) -> bool:
    user = session.scalar(select(db.User).where(db.User.username == username))
    if user is None:
        return False
    session.delete(user)
    session.execute(delete(db.WebSession).where(db.WebSession.username == username))
    return True


def verify_password(session: Session, username: str, password: str) -> bool:
    """Whether ``password`` is ``username``'s; an unknown user costs the same time as a wrong password."""
    user = session.scalar(select(db.User).where(db.User.username == username.strip()))
    try:
        return _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
    except (VerificationError, InvalidHashError):
        return False


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def open_session(session: Session, username: str, hours: float) -> tuple[str, LoggedIn]:
    """A new session for ``username``: (the cookie's token, who is logged in)."""
    now = db.utcnow()
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.execute(delete(db.WebSession).where(db.WebSession.expires_at < now))
    session.add(
        db.WebSession(
            token_sha256=_sha(token),
            username=username,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + dt.timedelta(hours=hours),
        )
    )
    return token, LoggedIn(username, csrf)


def current(session: Session, token: str | None) -> LoggedIn | None:
    """Who the cookie's token belongs to, while the session lasts and the user exists."""
    if not token:
        return None
    row = session.get(db.WebSession, _sha(token))
    if row is None or row.expires_at < db.utcnow():
        return None
    if session.scalar(select(db.User.id).where(db.User.username == row.username)) is None:
        return None
    return LoggedIn(row.username, row.csrf_token)


def close_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(db.WebSession).where(db.WebSession.token_sha256 == _sha(token)))


def csrf_ok(user: LoggedIn | None, presented: str | None) -> bool:
    return user is not None and bool(presented) and hmac.compare_digest(user.csrf_token, str(presented))


def address_allowed(address: str | None, networks: tuple[str, ...]) -> bool:
    """Whether a client may use the page: any when no networks are configured."""
    if not networks:
        return True
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def recently_audited(session: Session, username: str, target: str, minutes: float) -> bool:
    """Whether ``username`` has an audit row on ``target`` from the last ``minutes``."""
    since = db.utcnow() - dt.timedelta(minutes=minutes)
    query = select(db.AuditEntry.id).where(
        db.AuditEntry.username == username, db.AuditEntry.target == target, db.AuditEntry.at >= since
    )
    return session.scalar(query.limit(1)) is not None


def audit(
    session: Session,
    action: str,
    username: str | None,
    remote_addr: str | None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        db.AuditEntry(
            at=db.utcnow(), username=username, action=action, target=target, detail=detail, remote_addr=remote_addr
        )
    )
