"""Password hashing with argon2id. Hashing is CPU work, so it runs off the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from bilten.settings import Settings

MIN_LENGTH = 10
MAX_LENGTH = 256


@dataclass(frozen=True)
class Passwords:
    hasher: PasswordHasher
    # Verified against when the account does not exist, so both paths cost the same.
    dummy_hash: str

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        def check() -> bool:
            try:
                return self.hasher.verify(password_hash or self.dummy_hash, password)
            except (VerificationError, InvalidHashError):
                return False

        return await asyncio.to_thread(check) and password_hash is not None

    def needs_rehash(self, password_hash: str) -> bool:
        return self.hasher.check_needs_rehash(password_hash)


def from_settings(settings: Settings) -> Passwords:
    hasher = PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
    )
    return Passwords(hasher, hasher.hash("not a password of anyone"))
