"""Tokens: random bearer secrets stored only as sha256 hashes, and the admin token's first-start setup.

Tokens carry 256 bits of randomness, so a plain sha256 (no slow KDF) is enough to make a leaked
database useless for logging in, and lookups stay O(1).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import Connection

from iota_orchestrator import db

ADMIN_KEY = "admin_token_sha256"


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and 0 < len(token) <= 512 else None


def is_admin(conn: Connection, token: str | None) -> bool:
    stored = db.get_meta(conn, ADMIN_KEY)
    return bool(token and stored and hmac.compare_digest(stored, hash_token(token)))


def ensure_admin(conn: Connection, from_env: str | None, rotate: bool = False) -> str | None:
    """Set the admin token at first start (or when rotating); return it when it was generated here.

    A token given through the environment is used as is and never echoed back.
    """
    if db.get_meta(conn, ADMIN_KEY) is not None and not rotate:
        return None
    token = from_env or new_token("iota_admin")
    db.set_meta(conn, ADMIN_KEY, hash_token(token))
    return None if from_env else token


def ensure_secret(conn: Connection) -> bytes:
    """The HMAC key that signs blob URLs; made once, kept in the database."""
    value = db.get_meta(conn, "url_secret")
    if value is None:
        value = secrets.token_hex(32)
        db.set_meta(conn, "url_secret", value)
    return bytes.fromhex(value)
