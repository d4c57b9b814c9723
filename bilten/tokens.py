"""Access tokens (JWT, HS256) and opaque secrets (refresh, verification and reset tokens).

Access tokens carry ``kid`` in their header: the id of the key that signed them, derived from the
key itself. The current key signs; older keys configured for rotation still verify. Only HS256
is accepted, whatever the token's header claims, so ``alg: none`` and algorithm confusion fail.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jwt

from bilten.settings import Settings

ALGORITHM = "HS256"
ISSUER = "bilten"
AUDIENCE = "bilten-api"
REQUIRED_CLAIMS = ("sub", "role", "sid", "exp", "iat", "jti", "iss", "aud")


class InvalidToken(Exception):
    pass


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Claims:
    user_id: str
    role: str
    session: str  # the refresh-token family it was issued for (bilten.sessions)
    jti: str
    expires_at: int


VERIFIED_MAX = 50_000  # tokens remembered as verified (about 500 bytes each)


@dataclass(frozen=True)
class Signer:
    current: str
    keys: dict[str, str]  # kid -> key, the current one included
    ttl: int
    # A token once verified is good until it expires, unless its session is revoked (checked
    # apart, in memory): a client's later requests skip the HMAC and the JSON decoding.
    verified: OrderedDict[str, Claims] = field(
        default_factory=OrderedDict, compare=False, repr=False
    )

    def issue(self, user_id: str, role: str, session: str, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "role": role,
            "sid": session,
            "iat": issued,
            "exp": issued + self.ttl,
            "jti": uuid.uuid4().hex,
            "iss": ISSUER,
            "aud": AUDIENCE,
        }
        return jwt.encode(
            claims, self.current, algorithm=ALGORITHM, headers={"kid": key_id(self.current)}
        )

    def verify(self, token: str) -> Claims:
        known = self.verified.get(token)
        if known is not None:
            if known.expires_at > time.time():
                return known
            del self.verified[token]
        claims = self._verify(token)
        if len(self.verified) >= VERIFIED_MAX:
            # The oldest; a dict's first key is found past the holes of deleted ones, which
            # grows slow once full (an OrderedDict's is at hand).
            self.verified.popitem(last=False)
        self.verified[token] = claims
        return claims

    def _verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
            key = self.keys.get(str(header.get("kid")))
            if key is None:
                raise InvalidToken("unknown signing key")
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
        return Claims(
            str(claims["sub"]),
            str(claims["role"]),
            str(claims["sid"]),
            str(claims["jti"]),
            claims["exp"],
        )


def signer(settings: Settings) -> Signer:
    if not settings.secret_key:
        raise ValueError("no secret key configured")
    keys = {key_id(k): k for k in (settings.secret_key, *settings.old_secret_keys)}
    return Signer(settings.secret_key, keys, settings.access_token_ttl)


def opaque() -> tuple[str, bytes]:
    """A fresh 256-bit secret for the client, and the digest we keep instead of it."""
    token = secrets.token_urlsafe(32)
    return token, digest(token)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
